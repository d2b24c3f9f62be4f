"""Stop a training job from inside, as Slurm does before a time limit, for the preemption and resume tests."""

import os
import signal

from rpat import objectives


def signal_at_step(monkeypatch, step: int, signum=signal.SIGTERM):
    """Send ``signum`` to this process just before the ``step``-th training loss (counted from 1 over the whole
    run) is computed; returns a function that restores the real loss, for the resumed run."""
    real, calls = objectives.compute_loss, {"n": 0}

    def signalled(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(objectives, "compute_loss", signalled)
    return lambda: monkeypatch.setattr(objectives, "compute_loss", real)
