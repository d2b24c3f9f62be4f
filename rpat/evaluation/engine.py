"""The block-wise evaluation loop: every measurement, block by block, resumable, with CUDA out-of-memory retries.

A measurement sees one block at a time (:class:`EvalContext`: the block's examples on the device, in batches of
the current batch size, and the block's own random generator). After each block - and each stage of a
measurement with stages - the progress is saved; a SIGTERM/SIGUSR1 received meanwhile then stops the job with
:class:`~rpat.preemption.Preempted` (exit code 75), and the rerun resumes from the saved progress.

On a CUDA out-of-memory error the batch size is halved (logged on stderr and recorded) and the block's
measurement is retried from its last saved stage. Clean, PGD-20 and CW outcomes do not depend on the batch size
(a block's PGD start is drawn for the whole block, see :func:`rpat.accuracy.pgd_start`); AutoAttack's do once a
block's still-robust examples no longer fit one batch (its batches are reseeded one by one).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

from rpat import blocks, data
from rpat.errors import UserError
from rpat.evaluation.progress import Progress
from rpat.preemption import Preempted, StopSignals
from rpat.settings import EvalSettings, Threat


class OutOfMemory(UserError, RuntimeError):
    """CUDA ran out of memory with a batch of one example."""


@dataclass
class Outcome:
    """A measurement's result on one block."""

    correct: torch.Tensor  # bool, one per example of the block (on the CPU)
    details: dict = field(default_factory=dict)  # eval.json entries that are the same for every block
    counts: dict = field(default_factory=dict)  # numbers summed over blocks (e.g. robust examples after each attack)
    warnings: list = field(default_factory=list)  # messages collected over blocks (duplicates dropped)


@dataclass(frozen=True)
class EvalContext:
    """What a measurement gets for one block of evaluated examples."""

    model: torch.nn.Module
    threat: Threat
    settings: EvalSettings
    batches: data.Batches  # the block's examples, on the device, in batches of the current batch size
    seed: int = 0  # the cell's seed
    key: str = ""  # the measurement's key
    block: int = 0  # the block's index among the cell's blocks
    done: Mapping[str, dict] = field(default_factory=dict)  # stages finished before (a resumed block)
    save_stage: Callable[[str, dict], None] = lambda stage, value: None

    def generator(self) -> torch.Generator:
        """The block's generator for this measurement: all its randomness comes from here."""
        return blocks.block_generator(self.seed, self.key, self.block, self.batches.x.device)


def _stop_if_asked(stop: StopSignals, progress: Progress, where: str) -> None:
    if stop.received is not None:
        raise Preempted(f"signal {stop.name} {where}; progress saved in {progress.path}; rerun to resume")


def _measure(m, make_ctx: Callable[[int], EvalContext], progress: Progress, block: int) -> Outcome:
    """``m.measure`` on one block, halving the batch after each CUDA out-of-memory error."""
    while True:
        ctx = make_ctx(progress.batch_size)
        try:
            return m.measure(ctx)
        except torch.cuda.OutOfMemoryError:
            old = min(progress.batch_size, len(ctx.batches.y))
            if old == 1:
                raise OutOfMemory(f"CUDA out of memory while measuring {m.key} on one example at a time (block "
                                  f"{block}); evaluate on a GPU with more free memory") from None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            new = progress.halve(m.key, block, len(ctx.batches.y))
            print(f"[rpat] CUDA out of memory measuring {m.key} on block {block} with batches of {old}: retrying "
                  f"with batches of {new}", file=sys.stderr)


def run(model, x: torch.Tensor, y: torch.Tensor, *, measurements: Iterable, threat: Threat, settings: EvalSettings,
        seed: int, block_ids: list[int], progress: Progress, stop: StopSignals) -> None:
    """Measure every block of ``block_ids`` (x, y: all evaluated examples, on the device) with every measurement,
    skipping what ``progress`` holds; save after each block and stage, stop with Preempted when signalled."""
    ranges = blocks.block_ranges(len(y), settings.block_size)
    model.eval()
    for m in measurements:
        for b in block_ids:
            if progress.finished(m.key, b) is not None:
                continue
            r = ranges[b]

            def save_stage(stage, value, key=m.key, b=b):
                progress.save_stage(key, b, stage, value)
                _stop_if_asked(stop, progress, f"after {key} stage {stage} of block {b}")

            def make_ctx(batch_size, m=m, b=b, r=r):
                return EvalContext(model, threat, settings, data.Batches(x[r.start:r.stop], y[r.start:r.stop],
                                   batch_size, device=x.device), seed=seed, key=m.key, block=b,
                                   done=progress.stages(m.key, b), save_stage=save_stage)

            progress.start()
            out = _measure(m, make_ctx, progress, b)
            progress.finish_block(m.key, b, {"correct": out.correct.to("cpu", torch.bool), "counts": out.counts,
                                             "warnings": out.warnings, "details": out.details})
            _stop_if_asked(stop, progress, f"after {m.key} on block {b}")
