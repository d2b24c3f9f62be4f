"""Stopping a long job early without losing work: SIGTERM/SIGUSR1 become a flag that jobs check between
steps; a job that stops saves a resumable state and exits with code 75 (EX_TEMPFAIL), which Slurm
profiles and the workflow treat as "rerun me"."""

from __future__ import annotations

import signal
import threading


class Preempted(RuntimeError):
    """Stopped by a signal after saving a resumable state (exit code 75, EX_TEMPFAIL)."""

    exit_code = 75


class StopSignals:
    """Turn SIGTERM/SIGUSR1 into a flag the loop checks between steps (no work is cut in half)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""
