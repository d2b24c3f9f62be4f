"""The training loop: one grid cell -> checkpoints + train.json (+ an MLflow run).

Per epoch: the objective plans the epoch (attack, regulariser, weight-average decay) and the recipes adjust
the plan (rpat/recipes.py: ε ramp-up, ``train.weight_average``); per batch an attack, AWP's weight
perturbation if on (rpat/awp.py), the objective's loss (+ RPAT), an SGD step with the learning rate from
``rpat.schedules``, the perturbation's removal, the objective's after-step hook and the weight-average
update; then validation (clean and PGD accuracy on the held-out split) of the selected model (the weight
average when there is one) decides the best checkpoint. The loop names no method: what differs between
methods lives on the objective (rpat/objectives/).

The training state (:class:`TrainingState`) is saved atomically after every epoch under
``<out>/state/`` (with ``<out>/progress.json``, what ``rpat status`` reads), and an interrupted job resumes
from it (model, optimizer, weight average, RNG states, history, epoch) when its settings are unchanged.
On SIGTERM or SIGUSR1 (what Slurm sends before a time-limit or preemption kill) the job finishes its
current step, saves its state *within* the epoch (example order, step, partial sums, RNG states) and
exits with code 75; rerun, it continues exactly where it stopped. A cell whose train.json and checkpoints exist with the same settings is not touched.

Several processes (``resources.processes``, rpat/distributed.py, docs/distributed.md) train one cell as one
process would: each takes its rows of every global batch; rank 0 writes every file and the MLflow run.

Loss parts are summed on the device and read once per epoch: no host synchronisation per step.
Speed options (``train.channels_last``, ``train.compile``) do not change float32 results;
``train.precision: bf16`` runs the forward passes under bf16 autocast (inputs, perturbations and
the optimizer stay float32).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from rpat import (accuracy, checkpoint, data, distributed, files, logged_model, models, objectives, processes, recipes,
                  runtime, schedules)
from rpat.averaging import WeightAverage, averaged_state
from rpat.awp import WeightPerturbation
from rpat.cells import Cell, CellFiles
from rpat.config import Config
from rpat.errors import UserError
from rpat.objectives import EpochPlan, Objective
from rpat.preemption import Preempted, StopSignals
from rpat.processes import World
from rpat.records import finished_record, write_progress, write_record
from rpat.settings import CellSettings, RpatSettings
from rpat.tracking import CellRun

__all__ = ["NonFiniteLoss", "Preempted", "train_cell", "train_step"]


class NonFiniteLoss(UserError, RuntimeError):
    """The loss became NaN or infinite; the last good state is kept."""


def precision_context(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _progress(iterable, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, disable=None, file=sys.stderr)


def train_step(objective: Objective, model, opt, x, y, plan: EpochPlan, hp: Mapping, rpat: RpatSettings | None, *,
               amp=None, average: WeightAverage | None = None, awp: WeightPerturbation | None = None,
               loss_model=None):
    """One optimisation step: attack, AWP's perturbation (if given), loss (+ RPAT), backward, SGD, the
    perturbation removed, the objective's after-step hook, and the weight-average update (with the epoch
    plan's decay). ``loss_model``: the model the loss's forwards call when it is not ``model`` (the
    DistributedDataParallel wrapper, which reduces the gradients; attacks and hooks call ``model``)."""
    amp = amp if amp is not None else contextlib.nullcontext()
    with amp:
        x_adv = objective.attack(model, x, y, plan.threat, hp)
    if awp is not None:
        v = awp.direction(x, y, x_adv, {**objective.defaults, **hp}, objectives.StepContext(reg_active=plan.reg_active),
                          amp)
        awp.perturb(v)
    with amp:
        loss, parts = objectives.compute_loss(objective, loss_model or model, x, y, x_adv, hp, rpat, teacher=average,
                                              reg_active=plan.reg_active)
    opt.zero_grad(set_to_none=True)
    scale = distributed.loss_scale()
    (loss * scale if scale != 1.0 else loss).backward()
    opt.step()
    if awp is not None:
        awp.restore(v)
    if objective.after_step is not None:
        objective.after_step(model, x, hp, amp)
    if average is not None:
        average.update(model, plan.average_decay)
    return loss, parts


@dataclass
class Trainer:
    """Everything one cell's training works with, set up once (:func:`setup`)."""

    settings: CellSettings
    objective: Objective
    device: torch.device
    splits: data.Splits
    model: torch.nn.Module
    fmodel: torch.nn.Module  # the model as the steps call it (compiled or not); shares its parameters
    opt: torch.optim.Optimizer
    average: WeightAverage | None
    batches: data.Batches
    val_batches: data.Batches
    amp: object
    shuffle: torch.Generator
    awp: WeightPerturbation | None = None
    world: World = World()
    loss_model: torch.nn.Module | None = None  # DistributedDataParallel(fmodel) when there are several ranks
    step_log: Path | None = None  # train.step_log: one line per step (rank 0)

    @property
    def selected(self) -> torch.nn.Module:
        """The model that is validated, selected and saved: the weight average when there is one."""
        return self.average.module if self.average is not None else self.model

    def meta(self) -> dict:
        s = self.splits
        return models.meta(self.settings.cell.model, num_classes=s.num_classes, in_channels=s.channels,
                           image_size=s.image_size, mean=s.mean, std=s.std)


def setup(settings: CellSettings, threads: int | None = None, world: World = World()) -> Trainer:
    """Everything the loop needs; with several ranks (``world``) the process group, global-batch BatchNorm,
    this rank's shard of every batch and the DDP wrapper too (rpat/distributed.py)."""
    cell, t = settings.cell, settings.train
    objective = objectives.OBJECTIVES[cell.method]
    device = distributed.rank_device(world, runtime.select_device(t.device))
    distributed.init(world, device)
    runtime.set_threads(threads or t.threads)
    runtime.seed_everything(cell.seed)
    if t.precision == "float64":  # weights, inputs and attacks in float64 (docs/distributed.md: exactness checks)
        torch.set_default_dtype(torch.float64)
    splits = data.load_splits(cell.dataset, settings.data.options())
    model = models.build(cell.model, num_classes=splits.num_classes, in_channels=splits.channels,
                         image_size=splits.image_size, mean=splits.mean, std=splits.std).to(device)
    if world.distributed and t.sync_batchnorm:
        model = distributed.sync_batchnorm(model, device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    # The weight average (the teacher of objectives whose loss uses it, else train.weight_average); each epoch's
    # plan sets its BatchNorm mode (eval unless a method asks otherwise, docs/faithfulness.md D19).
    wa = t.weight_average
    average = WeightAverage(model, recipes.average_rule(wa)).to(device).eval() \
        if objective.uses_teacher or wa.kind != "none" else None
    awp = WeightPerturbation(model, objective.loss, t.awp.gamma, t.awp.warmup) if t.awp.enabled else None
    shuffle = torch.Generator().manual_seed(cell.seed)
    d = settings.data
    batches = data.training_batches(splits, d, views=objective.views, device=device, generator=shuffle)
    val_batches = data.Batches(*(splits.test if t.select == "test" else splits.val), d.eval_batch_size, device=device)
    fmodel = torch.compile(model) if t.compile else model
    loss_model = None
    if world.distributed:
        processes.check_split(world.size, d.batch_size, batches.examples)
        batches = distributed.ShardedBatches(batches, objective.views, world)
        loss_model = torch.nn.parallel.DistributedDataParallel(
            fmodel, device_ids=[device] if device.type == "cuda" else None, forward_sync_buffers=False)
    return Trainer(settings, objective, device, splits, model, fmodel, opt, average, batches, val_batches,
                   precision_context(t.precision, device), shuffle, awp, world, loss_model)


@dataclass
class TrainingState:
    """What a resumed job needs besides the settings: weights, optimizer, RNG states, history, best epoch,
    the MLflow run, and (after a signal) the position inside an epoch. Saves and restores itself."""

    files: CellFiles
    fingerprint: str
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": 0, "metric": -1.0})
    epoch: int = 0  # the last completed epoch
    run_id: str | None = None
    wall_before: float = 0.0
    partial: dict | None = None
    started: float = field(default_factory=time.time)

    @property
    def path(self) -> Path:
        return self.files.training_state_file

    @property
    def wall_s(self) -> float:
        return self.wall_before + time.time() - self.started

    def save(self, tr: Trainer, partial: dict | None = None) -> None:
        """Rank 0 writes the state (every rank holds the same one: no per-rank layout)."""
        if not tr.world.main:
            return
        checkpoint.save({"model": tr.model.state_dict(), "optimizer": tr.opt.state_dict(), "epoch": self.epoch,
                         "average": tr.average.state_dict() if tr.average is not None else None,
                         "fingerprint": self.fingerprint, "rng": runtime.rng_state(tr.device),
                         "shuffle_rng": tr.shuffle.get_state(), "history": self.history, "best": self.best,
                         "run_id": self.run_id, "partial": partial, "wall_s": self.wall_s}, self.path)

    @classmethod
    def restore(cls, files: CellFiles, tr: Trainer, fingerprint: str) -> "TrainingState":
        """The saved state if it was written with these settings (loaded into ``tr``), else a fresh one."""
        path = files.training_state_file
        fresh = cls(files, fingerprint)
        if not path.exists():
            return fresh
        state = checkpoint.load(path, map_location=tr.device, hint=f"delete {path.parent} to restart this cell "
                                                                     "from scratch")
        label = tr.settings.cell.id
        if state.get("fingerprint") != fingerprint:
            if tr.world.main:
                print(f"[rpat] {label}: settings changed since {path} was written; training from scratch",
                      file=sys.stderr)
            return fresh
        fix = f"the data or model changed since it was written: delete {path.parent} to restart this cell from scratch"
        checkpoint.load_weights(tr.model, state["model"], path, fix)
        if tr.average is not None:
            checkpoint.load_weights(tr.average, averaged_state(state["average"]), path, fix)
        tr.opt.load_state_dict(state["optimizer"])
        tr.shuffle.set_state(state["shuffle_rng"])
        runtime.set_rng_state(state["rng"], tr.device)
        out = cls(files, fingerprint, state["history"], state["best"], state["epoch"], state.get("run_id"),
                  state.get("wall_s", 0.0), state.get("partial"))
        where = f"epoch {out.epoch + 1}, step {out.partial['step']}" if out.partial else f"epoch {out.epoch + 1}"
        if tr.world.main:
            print(f"[rpat] {label}: resuming at {where}", file=sys.stderr)
        return out


def run_epoch(tr: Trainer, state: TrainingState, epoch: int, stop: StopSignals, resumed: bool = False) -> dict:
    """Train one epoch (or its rest, after a signal); returns the epoch's record of learning rate and mean loss
    parts. A signal saves the position within the epoch and raises :class:`Preempted`. ``resumed``: this is
    the first epoch a resumed job trains (the objective's plan may depend on it). With several ranks, loss
    sums are each rank's and reduced at the end (and before a save), and a signal on any rank stops all."""
    s = tr.settings
    t_epoch = time.time()
    tr.model.train()
    rpat = s.rpat if (s.rpat is not None and epoch >= s.rpat.start_epoch) else None
    plan = recipes.epoch_plan(tr.objective, s, epoch, resumed=resumed)
    awp = tr.awp if tr.awp is not None and tr.awp.active(epoch) else None
    if tr.average is not None:
        tr.average.train(plan.average_bn == "train")
    n_batches = len(tr.batches)
    order, first, sums, bad_step = _epoch_start(tr, state)
    t_epoch -= state.partial["seconds"] if state.partial is not None else 0.0
    state.partial = None
    step_ids = torch.arange(n_batches, device=tr.device)  # indexed per step: no host-to-device copy in the loop
    lr = s.train.lr
    batches = _progress(_shards(tr.batches, order, first), n_batches - first, f"epoch {epoch}")
    for step, (x, y, shard) in enumerate(batches, start=first):
        lr = schedules.lr_at(s.train.schedule, s.train.lr, epoch, (step + 1) / n_batches, s.train.epochs)
        for group in tr.opt.param_groups:
            group["lr"] = lr
        with distributed.step(shard):
            loss, parts = train_step(tr.objective, tr.fmodel, tr.opt, x, y, plan, s.method, rpat, amp=tr.amp,
                                     average=tr.average, awp=awp, loss_model=tr.loss_model)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v.detach().to(torch.get_default_dtype()) * len(y)
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step_ids[step], bad_step)
        if tr.step_log is not None:
            _log_step(tr, epoch, step, parts, len(y), shard)
        if distributed.agree(stop.received is not None) and step + 1 < n_batches:
            state.save(tr, {"order": order, "step": step + 1, "sums": distributed.sum_over_ranks(sums),
                            "bad_step": distributed.first_bad_step(bad_step), "seconds": time.time() - t_epoch})
            distributed.barrier()  # no rank exits before the state is written
            raise Preempted(f"{s.cell.id}: signal {stop.name or 'on another rank'} at epoch {epoch}, step "
                            f"{step + 1}/{n_batches}; state saved in {state.path}; rerun to resume")
    sums, bad_step = distributed.sum_over_ranks(sums), distributed.first_bad_step(bad_step)
    if int(bad_step) >= 0:
        raise NonFiniteLoss(f"{s.cell.id}: non-finite loss at epoch {epoch}, step {int(bad_step)}; the last good "
                            f"state (epoch {epoch - 1}) is in {state.path.parent}; lower train.lr or check the "
                            "data, then rerun")
    n_train = tr.batches.examples * tr.objective.views
    record = {"epoch": epoch, "lr": lr}
    record.update({f"loss_{k}": float(v) / n_train for k, v in sums.items()})
    if tr.device.type == "cuda":  # this process's peak (rank 0's; every rank holds the same share)
        record["max_gpu_mb"] = torch.cuda.max_memory_allocated(tr.device) / 2**20
    record["t_epoch"] = t_epoch
    return record


def _epoch_start(tr: Trainer, state: TrainingState) -> tuple:
    """(example order, first step, loss sums, first non-finite step) of a new epoch, or of the rest of one a
    signal interrupted. Saved sums are the global ones: rank 0 carries them on, the other ranks start at 0."""
    p = state.partial
    if p is None:
        return tr.batches.new_order(), 0, {}, torch.full((), -1, dtype=torch.long, device=tr.device)
    sums = p["sums"] if tr.world.main else {k: torch.zeros_like(v) for k, v in p["sums"].items()}
    return p["order"], p["step"], sums, p["bad_step"]


def _shards(batches, order, first: int):
    """``(x, y, shard)`` per step: this rank's rows of the global batch, or the batch itself (shard None)."""
    if isinstance(batches, distributed.ShardedBatches):
        yield from batches.iterate(order, first)
        return
    for x, y in batches.iterate(order, first):
        yield x, y, None


def _log_step(tr: Trainer, epoch: int, step: int, parts: dict, rows: int, shard) -> None:
    """``train.step_log``: the global batch's loss parts of this step, one JSON line (a host sync per step)."""
    total = shard.total if shard is not None else rows
    sums = distributed.sum_over_ranks({k: v.detach().to(torch.float64) * rows for k, v in parts.items()})
    if tr.world.main:
        line = {"epoch": epoch, "step": step, "time": time.time(), **{k: float(v) / total for k, v in sums.items()}}
        with open(tr.step_log, "a") as f:
            f.write(json.dumps(line) + "\n")


def validate_and_select(tr: Trainer, state: TrainingState, record: dict) -> dict:
    """Validation accuracies into the record; the best checkpoint so far (CellFiles.best_so_far) follows the
    selection rule."""
    s = tr.settings
    val = accuracy.accuracies(tr.selected, tr.val_batches, s.threat, steps=s.train.val_attack_steps)
    t_epoch = record.pop("t_epoch")
    record.update({"val_clean": val["clean"], "val_pgd": val["pgd"], "epoch_s": time.time() - t_epoch})
    metric = val[tr.objective.select_on]
    if s.train.select == "last" or metric > state.best["metric"]:
        state.best = {"epoch": record["epoch"], "metric": metric}
        if tr.world.main:
            checkpoint.save({"model": tr.selected.state_dict(), "epoch": record["epoch"],
                             "fingerprint": state.fingerprint, **tr.meta()}, state.files.best_so_far)
    return record


def finish(tr: Trainer, state: TrainingState, run: CellRun, tracking: Mapping) -> dict:
    """The final checkpoints, the selected one logged as the run's MLflow model (``tracking.log_model``), and
    train.json (written last: its presence means the cell is trained)."""
    s, t, cf = tr.settings, tr.settings.train, state.files
    checkpoint.save({"model": tr.selected.state_dict(), "epoch": t.epochs, "fingerprint": state.fingerprint,
                     **tr.meta()}, cf.checkpoint("last"))
    files.atomic_write(cf.checkpoint("best"), lambda tmp: shutil.copyfile(cf.best_so_far, tmp))
    if tracking.get("log_model", True):
        logged_model.log_model(run, cf.checkpoint("best"), tracking.get("register_model"), s.cell.tags())
    selection = {"rule": t.select, "split": "test" if t.select == "test" else "val",
                 "metric": f"val_{tr.objective.select_on}", "best_epoch": state.best["epoch"],
                 "best_value": state.best["metric"]}
    wall_s = state.wall_s
    return write_record(s, cf.run, run, fingerprint=state.fingerprint, selection=selection, history=state.history,
                        wall_s=wall_s, device=tr.device,
                        metrics={"best_epoch": state.best["epoch"], "best_val_metric": state.best["metric"],
                                 "train_wall_s": wall_s})


def train(settings: CellSettings, out_dir: str | Path, *, tracking: Mapping, threads: int | None = None) -> dict:
    """Train one cell into ``out_dir``; returns the train.json record. One of several ranks when the environment
    says so (rpat/distributed.py): then rank 0 writes every file and the MLflow run, and the others compute."""
    out_dir = Path(out_dir)
    fp = settings.train_fingerprint
    world = processes.world_from_env()
    done = finished_record(out_dir, fp)
    if done is not None:
        if world.main:
            print(f"[rpat] {settings.cell.id}: already trained with these settings "
                  f"({CellFiles(out_dir).train_record}); nothing to do", file=sys.stderr)
        return done
    objective = objectives.OBJECTIVES[settings.cell.method]
    if objective.provide is not None:  # weights from elsewhere (a pretrained model): nothing to train
        return objective.provide(settings, out_dir, tracking) if world.main else {}
    dtype = torch.get_default_dtype()  # train.precision: float64 changes it for the job
    try:
        return _train(setup(settings, threads, world), out_dir, tracking, fp)
    finally:
        distributed.shutdown()
        torch.set_default_dtype(dtype)


def _train(tr: Trainer, out_dir: Path, tracking: Mapping, fp: str) -> dict:
    settings, main, cf = tr.settings, tr.world.main, CellFiles(out_dir)
    state = TrainingState.restore(cf, tr, fp)
    run = CellRun(tracking["uri"], settings.experiment, settings.cell.tags(), run_id=state.run_id,
                  enabled=tracking["enabled"] and main, new=state.run_id is None, name=settings.run_name)
    state.run_id = run.run_id if main else state.run_id
    tr.step_log = cf.step_log if settings.train.step_log else None
    if tr.world.distributed and main:
        backend = "nccl" if tr.device.type == "cuda" else "gloo"
        print(f"[rpat] {settings.cell.id}: {tr.world.size} processes ({backend}), "
              f"{settings.data.batch_size // tr.world.size} examples of each batch per process", file=sys.stderr)
    if tr.step_log is not None and main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if state.epoch == 0 and state.partial is None:
        run.log_params(settings.resolved)
        run.set_tags({"train_fingerprint": fp, "processes": str(tr.world.size)})
        for split in ("train", "val"):
            x, y = getattr(tr.splits, split)
            run.log_dataset(settings.cell.dataset, split, data.digest(x, y), len(y))
    epochs, first = settings.train.epochs, state.epoch + 1
    resumed = state.epoch > 0 or state.partial is not None
    with run, StopSignals() as stop:  # the run ends FINISHED, KILLED (a signal, Ctrl-C) or FAILED
        for epoch in range(first, epochs + 1):
            record = validate_and_select(tr, state, run_epoch(tr, state, epoch, stop, resumed and epoch == first))
            state.history.append(record)
            state.epoch = epoch
            state.save(tr)
            if main:
                write_progress(out_dir, settings, state)
                run.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
                print(f"[rpat] {settings.cell.id} epoch {epoch}/{epochs} loss {record.get('loss_total', math.nan):.4f} "
                      f"val clean {record['val_clean']:.2f} pgd {record['val_pgd']:.2f} ({record['epoch_s']:.1f}s)",
                      file=sys.stderr)
            if distributed.agree(stop.received is not None) and epoch < epochs:
                distributed.barrier()
                raise Preempted(f"{settings.cell.id}: signal {stop.name or 'on another rank'} after epoch {epoch}; "
                                f"state saved in {state.path}; rerun to resume")
        record = finish(tr, state, run, tracking) if main else None
        distributed.barrier()  # train.json is written before any rank reports the cell done
        return record if record is not None else files.read_json(cf.train_record)


def train_cell(cfg: Config, cell: Cell, out_dir: str | Path, *, threads: int | None = None) -> dict:
    """Train ``cell`` of ``cfg`` into ``out_dir`` (see :func:`train`)."""
    return train(cfg.settings(cell), out_dir, tracking=cfg.tracking, threads=threads)
