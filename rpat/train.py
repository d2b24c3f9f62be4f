"""The training loop: one grid cell -> checkpoints + train.json (+ an MLflow run).

Per epoch: attack + objective (+ RPAT) per batch, SGD step, learning rate from ``rpat.schedules``;
then validation (clean and PGD accuracy on the held-out split) decides the best checkpoint.
State is saved atomically after every epoch under ``<out>/state/``, and an interrupted job resumes
from it (model, optimizer, RNG states, history, epoch) when its settings are unchanged.

On SIGTERM or SIGUSR1 (what Slurm sends before a time-limit or preemption kill) the job finishes
its current step, saves its state *within* the epoch (example order, step, partial sums, RNG states)
and exits with code 75; rerun, it continues exactly where it stopped.

Loss parts are summed on the device and read once per epoch: no host synchronisation per step.
Speed options (``train.channels_last``, ``train.compile``) do not change float32 results;
``train.precision: bf16`` runs the forward passes under bf16 autocast (inputs, perturbations and
the optimizer stay float32).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from rpat import checkpoint, data, evaluate, models, objectives, runtime, schedules
from rpat.averaging import WeightAverage
from rpat.errors import UserError
from rpat.config import Config, fingerprint, train_settings
from rpat.tracking import CellRun


class NonFiniteLoss(UserError, RuntimeError):
    """The loss became NaN or infinite; the last good state is kept."""


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


def precision_context(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model_for(splits: data.Splits, model_name: str) -> torch.nn.Module:
    return models.build(model_name, num_classes=splits.num_classes, in_channels=splits.channels,
                        image_size=splits.image_size, mean=splits.mean, std=splits.std)


def model_meta(splits: data.Splits, model_name: str) -> dict:
    return {"model_name": model_name, "num_classes": splits.num_classes, "in_channels": splits.channels,
            "image_size": splits.image_size, "mean": list(splits.mean), "std": list(splits.std)}


def _progress(iterable, total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, disable=None, file=sys.stderr)
    except ImportError:  # pragma: no cover
        return iterable


def train_step(objective, model, opt, x, y, threat: dict, hp: dict, rpat: dict | None, *, amp=None,
               teacher: WeightAverage | None = None, decay: float = 0.0):
    """One optimisation step: attack, loss (+ RPAT), backward, SGD; for ReBAT / RPAT++ also the reference's
    clean train-mode forward (BatchNorm statistics see clean data) and the weight-average update."""
    amp = amp if amp is not None else contextlib.nullcontext()
    with amp:
        x_adv = objective.attack(model, x, y, threat, hp)
        loss, parts = objectives.compute_loss(objective, model, x, y, x_adv, hp, rpat)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if teacher is not None:
        if hp["clean_bn_forward"]:
            with torch.no_grad(), amp:
                model(x)
        teacher.update(model, decay)
    return loss, parts


def epoch_settings(threat: dict, hp: dict, epoch: int, teacher) -> tuple[dict, dict, float]:
    """The epoch's attack settings, hyperparameters and weight-averaging decay.

    ReBAT: from ``warmup_epoch`` on, the regulariser is active and the average decays with ``decay``
    (before it, decay 0 keeps the average an exact copy); from ``stronger_attack.start_epoch`` on, the
    optional stronger attack (eps, steps) replaces the threat model's training attack.
    """
    threat_e = dict(threat)
    stronger = hp.get("stronger_attack") or {}
    if stronger.get("enabled") and epoch >= stronger["start_epoch"]:
        threat_e.update(eps=stronger["eps"], steps=stronger["steps"])
    if teacher is None:
        return threat_e, hp, 0.0
    active = epoch >= hp["warmup_epoch"]
    return threat_e, {**hp, "teacher": teacher, "reg_active": active}, (hp["decay"] if active else 0.0)


def train_cell(cfg: Config, cell, out_dir: str | Path, *, threads: int | None = None) -> dict:
    """Train one cell into ``out_dir``; returns the train.json record."""
    out_dir = Path(out_dir)
    resolved = cfg.resolve(cell)
    fp = fingerprint(train_settings(resolved))
    tcfg, threat = resolved["train"], {**resolved["threat"][cell.norm], "norm": cell.norm}
    objective = objectives.OBJECTIVES[cell.method]
    hp = {**objective.defaults, **resolved["methods"].get(cell.method, {})}
    rpat_cfg = resolved["rpat"] if cell.rpat else None

    device = runtime.select_device(tcfg["device"])
    runtime.set_threads(threads or tcfg.get("threads"))
    runtime.seed_everything(cell.seed)

    splits = data.load_splits(cell.dataset, resolved["data"])
    model = build_model_for(splits, cell.model).to(device)
    if tcfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    # The compiled module shares the parameters; validation and checkpoints use the plain one.
    fmodel = torch.compile(model) if tcfg["compile"] else model
    opt = torch.optim.SGD(model.parameters(), lr=tcfg["lr"], momentum=tcfg["momentum"],
                          weight_decay=tcfg["weight_decay"])
    # ReBAT / RPAT++: the weight-averaged teacher, always in eval mode (REFERENCE.md 1.11 leaves its
    # first epoch in train mode by accident); it is also the model that is selected and evaluated.
    teacher = WeightAverage(model).to(device).eval() if objective.uses_teacher else None
    shuffle_gen = torch.Generator().manual_seed(cell.seed)
    dcfg = resolved["data"]
    train_batches = data.Batches(*splits.train, dcfg["batch_size"], shuffle=True,
                                 augment=data.AUGMENTATIONS[dcfg["augment"]], views=objective.views,
                                 device=device, generator=shuffle_gen)
    select_split = splits.test if tcfg["select"] == "test" else splits.val
    val_batches = data.Batches(*select_split, dcfg["eval_batch_size"], device=device)
    amp = precision_context(tcfg["precision"], device)

    state_dir = out_dir / "state"
    last_path = state_dir / "last.pt"
    history: list[dict] = []
    best = {"epoch": 0, "metric": -1.0}
    start_epoch, run_id, wall_before, partial = 1, None, 0.0, None
    if last_path.exists():
        state = checkpoint.load(last_path, map_location=device,
                                hint=f"delete {state_dir} to restart this cell from scratch")
        if state.get("fingerprint") == fp:
            model.load_state_dict(state["model"])
            if teacher is not None:
                teacher.module.load_state_dict(state["teacher"])
            opt.load_state_dict(state["optimizer"])
            shuffle_gen.set_state(state["shuffle_rng"])
            runtime.set_rng_state(state["rng"])
            history, best, run_id = state["history"], state["best"], state.get("run_id")
            start_epoch, wall_before, partial = state["epoch"] + 1, state.get("wall_s", 0.0), state.get("partial")
            where = f"epoch {start_epoch}, step {partial['step']}" if partial else f"epoch {start_epoch}"
            print(f"[rpat] {cell.id}: resuming at {where}", file=sys.stderr)
        else:
            print(f"[rpat] {cell.id}: settings changed since {last_path} was written; training from scratch",
                  file=sys.stderr)

    run = CellRun(cfg.tracking["uri"], cfg.experiment, cell.tags(), run_id=run_id,
                  enabled=cfg.tracking["enabled"], new=run_id is None)
    if start_epoch == 1 and partial is None:
        run.log_params(resolved)
        run.set_tags({"train_fingerprint": fp})

    def save_state(epoch_done: int, partial_state: dict | None) -> None:
        checkpoint.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch_done,
                         "teacher": teacher.module.state_dict() if teacher is not None else None,
                         "fingerprint": fp, "rng": runtime.rng_state(), "shuffle_rng": shuffle_gen.get_state(),
                         "history": history, "best": best, "run_id": run.run_id, "partial": partial_state,
                         "wall_s": wall_before + time.time() - t0}, last_path)

    t0 = time.time()
    n_batches = len(train_batches)
    step_ids = torch.arange(n_batches, device=device)  # indexed per step: no host-to-device copy in the loop
    with StopSignals() as stop:
        for epoch in range(start_epoch, tcfg["epochs"] + 1):
            t_epoch = time.time()
            model.train()
            use_rpat = rpat_cfg if (rpat_cfg and epoch >= rpat_cfg["start_epoch"]) else None
            threat_e, hp_e, decay = epoch_settings(threat, hp, epoch, teacher)
            if partial is not None:  # resume inside this epoch
                order, first, sums, bad_step = partial["order"], partial["step"], partial["sums"], partial["bad_step"]
                t_epoch -= partial["seconds"]
                partial = None
            else:
                order, first, sums = train_batches.new_order(), 0, {}
                bad_step = torch.full((), -1, dtype=torch.long, device=device)
            batches = train_batches.iterate(order, first)
            for step, (x, y) in enumerate(_progress(batches, n_batches - first, f"epoch {epoch}"), start=first):
                lr = schedules.lr_at(tcfg["schedule"], tcfg["lr"], epoch, (step + 1) / n_batches, tcfg["epochs"])
                for group in opt.param_groups:
                    group["lr"] = lr
                loss, parts = train_step(objective, fmodel, opt, x, y, threat_e, hp_e, use_rpat, amp=amp,
                                         teacher=teacher, decay=decay)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() * len(y)
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step_ids[step], bad_step)
                if stop.received is not None and step + 1 < n_batches:
                    save_state(epoch - 1, {"order": order, "step": step + 1, "sums": sums, "bad_step": bad_step,
                                           "seconds": time.time() - t_epoch})
                    raise Preempted(f"{cell.id}: signal {signal.Signals(stop.received).name} at epoch {epoch}, "
                                    f"step {step + 1}/{n_batches}; state saved in {last_path}; rerun to resume")
            if int(bad_step) >= 0:
                raise NonFiniteLoss(f"{cell.id}: non-finite loss at epoch {epoch}, step {int(bad_step)}; "
                                    f"the last good state (epoch {epoch - 1}) is in {state_dir}; lower train.lr "
                                    "or check the data, then rerun")
            n_train = len(train_batches.y) * objective.views
            record = {"epoch": epoch, "lr": lr}
            record.update({f"loss_{k}": float(v) / n_train for k, v in sums.items()})
            selected = teacher.module if teacher is not None else model
            val = evaluate.accuracies(selected, val_batches, threat, steps=tcfg["val_attack_steps"])
            record.update({"val_clean": val["clean"], "val_pgd": val["pgd"], "epoch_s": time.time() - t_epoch})
            history.append(record)

            metric = val[objective.select_on]
            if tcfg["select"] == "last" or metric > best["metric"]:
                best = {"epoch": epoch, "metric": metric}
                checkpoint.save({"model": selected.state_dict(), "epoch": epoch, "fingerprint": fp,
                                 **model_meta(splits, cell.model)}, state_dir / "best.pt")
            save_state(epoch, None)
            run.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
            print(f"[rpat] {cell.id} epoch {epoch}/{tcfg['epochs']} loss {record.get('loss_total', math.nan):.4f} "
                  f"val clean {val['clean']:.2f} pgd {val['pgd']:.2f} ({record['epoch_s']:.1f}s)", file=sys.stderr)
            if stop.received is not None and epoch < tcfg["epochs"]:
                raise Preempted(f"{cell.id}: signal {signal.Signals(stop.received).name} after epoch {epoch}; "
                                f"state saved in {last_path}; rerun to resume")

    meta = model_meta(splits, cell.model)
    final = teacher.module if teacher is not None else model
    checkpoint.save({"model": final.state_dict(), "epoch": tcfg["epochs"], "fingerprint": fp, **meta},
                    out_dir / "checkpoint-last.pt")
    runtime.atomic_write(out_dir / "checkpoint-best.pt", lambda tmp: shutil.copyfile(state_dir / "best.pt", tmp))
    result = {
        "cell": cell.id,
        **cell.tags(),
        "rpat": cell.rpat,
        "seed": cell.seed,
        "experiment": cfg.experiment,
        "fingerprint": fp,
        "selection": {"rule": tcfg["select"], "split": "test" if tcfg["select"] == "test" else "val",
                      "metric": f"val_{objective.select_on}", "best_epoch": best["epoch"],
                      "best_value": best["metric"]},
        "checkpoints": {"best": "checkpoint-best.pt", "last": "checkpoint-last.pt"},
        "history": history,
        "wall_s": wall_before + time.time() - t0,
        "device": str(device),
        "torch": torch.__version__,
        "mlflow_run_id": run.run_id,
        "settings": resolved,
    }
    runtime.write_json(out_dir / "train.json", result)
    run.log_metrics({"best_epoch": best["epoch"], "best_val_metric": best["metric"], "train_wall_s": result["wall_s"]})
    run.log_artifact(out_dir / "train.json")
    return result
