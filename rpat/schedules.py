"""Learning-rate schedules as pure functions of training time (no scheduler state to save or restore).

``lr_at(schedule, lr, epoch, fraction, epochs)``: ``epoch`` is 1-based, ``fraction`` in (0, 1] is the
part of that epoch done after the current step.
  constant   lr
  multistep  lr * gamma^#{m in milestones : epoch > m}          per epoch (Benchmarks: [100, 105], 0.1)
  cosine     lr * (1 + cos(pi (epoch-1) / E)) / 2                per epoch (CosineAnnealingLR, T_max = E)
  piecewise  t = epoch - 1 + fraction;  lr / factor^#{m in milestones : t >= m}
             per iteration (ReBAT: milestones [100, 150], factor 1.5)
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "multistep", "cosine", "piecewise")


def lr_at(schedule: dict, lr: float, epoch: int, fraction: float, epochs: int) -> float:
    name = schedule["name"]
    if name == "constant":
        return lr
    if name == "multistep":
        return lr * schedule.get("gamma", 0.1) ** sum(epoch > m for m in schedule.get("milestones", []))
    if name == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))
    if name == "piecewise":
        t = epoch - 1 + fraction
        return lr / schedule.get("factor", 1.5) ** sum(t >= m for m in schedule.get("milestones", [100, 150]))
    raise ValueError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
