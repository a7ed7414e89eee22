"""A run's logged numbers as TensorBoard scalars (`tensorboard --logdir runs/`).

metrics.jsonl stays the source of truth; this mirrors each logged line into event files in
RUN/tensorboard/ through TensorBoard's own writer (torch.utils.tensorboard), so every run and
every resumed stretch of one shows up as one curve per number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FLUSH_SECONDS = 10  # a live run's curves lag its log by at most this

# tags: the step's metrics under train/, held-out under val/, where the time went under time/
GROUPS = {"heldout_loss": "val", "tasks_per_s": "time", "skipped_steps": "train"}


class Scalars:
    """Writes a metrics.jsonl record's numbers as scalars at its step."""

    def __init__(self, run_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported here: ~1 s, and only training needs it

        # purge_step: a run resumed from an earlier checkpoint than its last logged step logs
        # those steps again; TensorBoard then drops the older file's events from that step on
        self.writer = SummaryWriter(
            str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None, flush_secs=FLUSH_SECONDS
        )

    def write(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for name, value in record.items():
            if name == "time" and isinstance(value, dict):
                for part, seconds in value.items():
                    if isinstance(seconds, int | float):
                        self.writer.add_scalar(f"time/{part}", seconds, step)
            elif name != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(f"{GROUPS.get(name, 'train')}/{name}", value, step)

    def close(self) -> None:
        self.writer.close()
