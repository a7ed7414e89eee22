"""One writer per run folder: an exclusive OS file lock on DIR/.lock.

`fcntl.flock` is released by the kernel when its holder exits, however it exits (a SIGKILLed run
never blocks its own resume). The file names the holder (pid and host) for the error a second
writer gets. `eval` and `plot` only read a run and take no lock.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from distributed_maml.errors import CheckpointError

LOCK_NAME = ".lock"


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._file = open(self.path, "a+")  # noqa: SIM115 - held for the run's lifetime
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().split() or ["?", "?"]
            self._file.close()
            raise CheckpointError(
                f"run {run_dir} is being written by pid {holder[0]} on host {holder[-1]}; one writer per run: "
                "wait for it to finish or stop it, then continue with --resume"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()} {socket.gethostname()}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
