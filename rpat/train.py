"""The training loop: one grid cell -> checkpoints + train.json (+ an MLflow run).

Per epoch: attack + objective (+ RPAT) per batch, SGD step, learning rate from ``rpat.schedules``;
then validation (clean and PGD accuracy on the held-out split) decides the best checkpoint.
State is saved atomically after every epoch under ``<out>/state/``, and an interrupted job resumes
from it (model, optimizer, RNG states, history, epoch) when its settings are unchanged.

Loss parts are summed on the device and read once per epoch: no host synchronisation per step.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from rpat import checkpoint, data, evaluate, models, objectives, runtime, schedules
from rpat.averaging import WeightAverage
from rpat.config import Config, fingerprint, train_settings
from rpat.tracking import CellRun


class NonFiniteLoss(RuntimeError):
    pass


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
    settings = train_settings(resolved)
    fp = fingerprint(settings)
    tcfg, threat = resolved["train"], {**resolved["threat"][cell.norm], "norm": cell.norm}
    objective = objectives.OBJECTIVES[cell.method]
    hp = {**objective.defaults, **resolved["methods"].get(cell.method, {})}
    rpat_cfg = resolved["rpat"] if cell.rpat else None

    device = runtime.select_device(tcfg["device"])
    runtime.set_threads(threads or tcfg.get("threads"))
    runtime.seed_everything(cell.seed)

    splits = data.load_splits(cell.dataset, resolved["data"])
    model = build_model_for(splits, cell.model).to(device)
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

    state_dir = out_dir / "state"
    history: list[dict] = []
    best = {"epoch": 0, "metric": -1.0}
    start_epoch, run_id, wall_before = 1, None, 0.0
    last_path = state_dir / "last.pt"
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
            start_epoch, wall_before = state["epoch"] + 1, state.get("wall_s", 0.0)
            print(f"[rpat] {cell.id}: resuming after epoch {state['epoch']}", file=sys.stderr)
        else:
            print(f"[rpat] {cell.id}: settings changed since {last_path} was written; training from scratch",
                  file=sys.stderr)

    run = CellRun(cfg.tracking["uri"], cfg.experiment, cell.tags(), run_id=run_id,
                  enabled=cfg.tracking["enabled"], new=run_id is None)
    if start_epoch == 1:
        run.log_params(resolved)
        run.set_tags({"train_fingerprint": fp})

    t0 = time.time()
    for epoch in range(start_epoch, tcfg["epochs"] + 1):
        t_epoch = time.time()
        model.train()
        use_rpat = rpat_cfg if (rpat_cfg and epoch >= rpat_cfg["start_epoch"]) else None
        threat_e, hp_e, decay = epoch_settings(threat, hp, epoch, teacher)
        sums: dict[str, torch.Tensor] = {}
        bad_step = torch.full((), -1, dtype=torch.long, device=device)
        n_batches = len(train_batches)
        for step, (x, y) in enumerate(_progress(train_batches, n_batches, f"epoch {epoch}")):
            lr = schedules.lr_at(tcfg["schedule"], tcfg["lr"], epoch, (step + 1) / n_batches, tcfg["epochs"])
            for group in opt.param_groups:
                group["lr"] = lr
            x_adv = objective.attack(model, x, y, threat_e, hp_e)
            loss, parts = objectives.compute_loss(objective, model, x, y, x_adv, hp_e, use_rpat)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if teacher is not None:
                if hp["clean_bn_forward"]:
                    with torch.no_grad():  # the reference's logging forward: BN running stats see clean data
                        model(x)
                teacher.update(model, decay)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach() * len(y)
            finite = torch.isfinite(loss.detach())
            bad_step = torch.where((bad_step < 0) & ~finite, torch.tensor(step, device=device), bad_step)
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

        improved = tcfg["select"] == "last" or val["pgd"] > best["metric"]
        if improved:
            best = {"epoch": epoch, "metric": val["pgd"]}
            checkpoint.save({"model": selected.state_dict(), "epoch": epoch, "fingerprint": fp,
                             **model_meta(splits, cell.model)}, state_dir / "best.pt")
        checkpoint.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                         "teacher": teacher.module.state_dict() if teacher is not None else None,
                         "fingerprint": fp, "rng": runtime.rng_state(), "shuffle_rng": shuffle_gen.get_state(),
                         "history": history, "best": best, "run_id": run.run_id,
                         "wall_s": wall_before + time.time() - t0}, last_path)
        run.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
        print(f"[rpat] {cell.id} epoch {epoch}/{tcfg['epochs']} loss {record.get('loss_total', math.nan):.4f} "
              f"val clean {val['clean']:.2f} pgd {val['pgd']:.2f} ({record['epoch_s']:.1f}s)", file=sys.stderr)

    meta = model_meta(splits, cell.model)
    final = teacher.module if teacher is not None else model
    checkpoint.save({"model": final.state_dict(), "epoch": tcfg["epochs"], "fingerprint": fp, **meta},
                    out_dir / "checkpoint-last.pt")
    best_state = checkpoint.load(state_dir / "best.pt")
    checkpoint.save({k: v for k, v in best_state.items() if k != "format"}, out_dir / "checkpoint-best.pt")
    result = {
        "cell": cell.id,
        **cell.tags(),
        "rpat": cell.rpat,
        "seed": cell.seed,
        "experiment": cfg.experiment,
        "fingerprint": fp,
        "selection": {"rule": tcfg["select"], "split": "test" if tcfg["select"] == "test" else "val",
                      "best_epoch": best["epoch"], "best_val_pgd": best["metric"]},
        "checkpoints": {"best": "checkpoint-best.pt", "last": "checkpoint-last.pt"},
        "history": history,
        "wall_s": wall_before + time.time() - t0,
        "device": str(device),
        "torch": torch.__version__,
        "mlflow_run_id": run.run_id,
        "settings": resolved,
    }
    runtime.write_json(out_dir / "train.json", result)
    run.log_metrics({"best_epoch": best["epoch"], "best_val_pgd": best["metric"], "train_wall_s": result["wall_s"]})
    run.log_artifact(out_dir / "train.json")
    return result
