"""A run's logged numbers as TensorBoard scalars (`tensorboard --logdir runs/`).

metrics.jsonl stays the source of truth; this mirrors each logged line into event files in
RUN/tensorboard/ through TensorBoard's own writer (torch.utils.tensorboard), so every run and
every resumed stretch of one shows up as one curve per number.

TensorBoard writes from a background thread. A write error there (a full disk, a file-size
limit) is raised again by the next `write` or `close` here, naming the events file, and becomes
the run's one-line error like any other write error; the thread's own traceback is silenced.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from distributed_maml.errors import with_filename

FLUSH_SECONDS = 10  # a live run's curves lag its log by at most this

# tags: the step's metrics under train/, the validation under val/, where the time went under time/
GROUPS = {"tasks_per_s": "time", "skipped_steps": "train"}

_default_excepthook = threading.excepthook


def _quiet_writer_thread(args: threading.ExceptHookArgs) -> None:
    """TensorBoard's writer thread fails loudly; its error reaches the run through Scalars."""
    if type(args.thread).__name__ != "_AsyncWriterThread":
        _default_excepthook(args)


class Scalars:
    """Writes a metrics.jsonl record's numbers as scalars at its step."""

    def __init__(self, run_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported here: ~1 s, and only training needs it

        threading.excepthook = _quiet_writer_thread
        self.dir = run_dir / "tensorboard"
        _after_the_last_file(self.dir)
        # purge_step: a run resumed from an earlier checkpoint than its last logged step logs
        # those steps again; TensorBoard then drops the older file's events from that step on
        self.writer = SummaryWriter(
            str(self.dir), purge_step=start_step + 1 if start_step else None, flush_secs=FLUSH_SECONDS
        )

    def write(self, record: dict[str, Any]) -> None:
        step = record["step"]
        try:
            for name, value in record.items():
                if name == "time" and isinstance(value, dict):
                    for part, seconds in value.items():
                        if isinstance(seconds, int | float):
                            self.writer.add_scalar(f"time/{part}", seconds, step)
                elif "@" in name and isinstance(value, int | float):  # a source's: source/<name>/<metric>
                    metric, _, source = name.partition("@")
                    self.writer.add_scalar(f"source/{source}/{metric}", value, step)
                elif name != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    group = "val" if name.startswith("val_") else GROUPS.get(name, "train")
                    self.writer.add_scalar(f"{group}/{name}", value, step)
        except OSError as e:
            raise with_filename(e, self._events_file()) from None

    def close(self, quiet: bool = False) -> None:
        """Flushes and closes the events file; `quiet`: while another error is on its way out,
        a write error here is dropped (the run's line names the first one)."""
        try:
            self.writer.close()
        except OSError as e:
            if not quiet:
                raise with_filename(e, self._events_file()) from None

    def _events_file(self) -> Path:
        name = getattr(getattr(self.writer.file_writer, "event_writer", None), "_file_name", None)
        return Path(name) if name else self.dir


def _after_the_last_file(directory: Path) -> None:
    """Waits (at most a second) until a new events file's name sorts after every existing one.
    TensorBoard reads a folder's files in name order, and a resume's purge of the older file's
    later steps works only if the resumed file comes after it. The name is
    events.out.tfevents.<second>.<host>.<pid>.<per-process counter>: a file made in the same
    second as the previous one by the same process (a sweep's trials, the tests) sorts by the
    counter as text, and ".10" sorts before ".9"."""
    seconds = []
    for f in directory.glob("events.out.tfevents.*"):
        field = f.name.split(".")[3]
        if field.isdigit():
            seconds.append(int(field))
    if seconds:
        wait = max(seconds) + 1 - time.time()
        if 0 < wait <= 1:
            time.sleep(wait)
