"""A cell's settings, resolved once into typed, frozen objects; their defaults are the embedded defaults.

The defaults are the paper's Benchmarks recipe (docs/faithfulness.md): the config's sections override them,
a grid block's ``set`` overrides those. ``rpat.config`` builds its ``DEFAULTS`` from the classes here, so
every default exists once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from types import MappingProxyType
from typing import Any, Mapping

from rpat.cells import Cell


@dataclass(frozen=True)
class Threat:
    """The threat model a cell is trained and evaluated for: the ``norm`` ball of radius ``eps``; training
    attacks take ``steps`` steps of size ``step``."""

    norm: str
    eps: float
    step: float
    steps: int

    def replace(self, **changes) -> "Threat":
        return replace(self, **changes)


# Per-norm defaults (docs/faithfulness.md): Linf 8/255, step 2/255; L2 128/255, step 15/255; 10 steps.
THREAT_DEFAULTS = {
    "linf": {"eps": 8 / 255, "step": 2 / 255, "steps": 10},
    "l2": {"eps": 128 / 255, "step": 15 / 255, "steps": 10},
}


@dataclass(frozen=True)
class CutMixSettings:
    """CutMix (Yun et al.) on training batches: lambda ~ Beta(alpha, beta) per batch (docs/faithfulness.md
    "Data and augmentation")."""

    enabled: bool = False
    alpha: float = 1.0
    beta: float = 1.0


@dataclass(frozen=True)
class DataSettings:
    root: str = "data"
    paths: dict = field(default_factory=dict)
    download: bool = False
    val_size: int = 1000
    split_seed: int = 0
    train_subset: int | None = None
    subset: str = "stratified"  # how train_subset is drawn (rpat/data/subsets.py)
    augment: str = "crop_flip"
    cutmix: CutMixSettings = field(default_factory=CutMixSettings)
    batch_size: int = 128
    eval_batch_size: int = 500
    # Extra (e.g. diffusion-generated) training images: an .npz with 'image' uint8 [N, H, W, C] and 'label' [N];
    # each training batch draws round-down(extra_fraction x batch_size) of its examples from it (rpat/data/extra.py).
    extra: str | None = None
    extra_fraction: float = 0.7

    def options(self) -> dict:
        """The plain dict the data set loaders read."""
        return asdict(self)


@dataclass(frozen=True)
class WeightAverageSettings:
    """``train.weight_average`` (rpat/averaging.py, docs/recipes.md): ``kind`` none, ema or swa. EMA: per-step
    ``decay``, a copy of the model for the first ``warmup_epochs`` epochs, then the decay ``ramp``
    min(decay, (1+t)/(10+t)); SWA: the equal-weight mean of every step's model from epoch ``swa_start`` on."""

    kind: str = "none"
    decay: float = 0.999
    warmup_epochs: int = 0
    ramp: bool = True
    swa_start: int = 101


@dataclass(frozen=True)
class AwpSettings:
    """``train.awp`` (rpat/awp.py): adversarial weight perturbation of relative size ``gamma``, from epoch
    ``warmup`` + 1 on (TRADES-AWP's published defaults: gamma 5e-3, AWP from epoch 10)."""

    enabled: bool = False
    gamma: float = 5e-3
    warmup: int = 9


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 110
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: dict = field(default_factory=lambda: {"name": "multistep", "milestones": [100, 105], "gamma": 0.1})
    select: str = "val"
    val_attack_steps: int = 10
    device: str = "auto"
    threads: int | None = None
    precision: str = "float32"
    channels_last: bool = False
    compile: bool = False
    weight_average: WeightAverageSettings = field(default_factory=WeightAverageSettings)
    awp: AwpSettings = field(default_factory=AwpSettings)
    eps_warmup_epochs: int = 0  # train with eps * min(1, epoch / eps_warmup_epochs) (rpat/recipes.py)
    sync_batchnorm: bool = True  # several processes: BatchNorm statistics of the global batch (rpat/distributed.py)
    step_log: bool = False  # <run>/steps.jsonl: every step's loss parts (a host synchronisation per step)


@dataclass(frozen=True)
class RpatSettings:
    """λ (``weight``), r (``clean_weight``: x_mid = r x + (1-r) x', the weight of the clean end) and the
    first epoch with the term."""

    weight: float = 1.0
    clean_weight: float = 0.5
    start_epoch: int = 1

    @classmethod
    def of(cls, given: "RpatSettings | Mapping | None") -> "RpatSettings | None":
        """Settings from a partial mapping (missing keys take the defaults); None stays None (RPAT off)."""
        if given is None or isinstance(given, RpatSettings):
            return given
        return cls(**given)


@dataclass(frozen=True)
class AutoAttackSettings:
    enabled: bool = True
    version: str = "standard"
    seed: int = 0


@dataclass(frozen=True)
class EvalSettings:
    checkpoints: list = field(default_factory=lambda: ["best"])  # the first is the primary (eval.json)
    n_examples: int | None = None
    subset: str = "stratified"  # how the n_examples are drawn from the test set (rpat/data/subsets.py)
    subset_seed: int = 0
    batch_size: int = 500
    pgd_steps: int = 20
    cw_steps: int = 30
    perception_alphas: int = 11  # points of [0, 1] at which `rpat perceive` measures the path x -> x'
    autoattack: AutoAttackSettings = field(default_factory=AutoAttackSettings)
    block_size: int = 500  # examples per block: the unit of randomness, saved progress and sharding
    shards: int = 1  # jobs one cell's evaluation is split into (over disjoint blocks), merged into eval.json
    # robustness curves (rpat/jobs/curve.py): [{norm, eps: [...], attacks: [...]}], evaluated into curve.json
    eps_grid: list = field(default_factory=list)


RESOURCE_DEFAULTS = {"gpu": 0, "cpus": 1, "mem_mb": 4000, "runtime": 60, "processes": 1, "nodes": 1}

# Keys that change where and how fast a job runs, not what it computes. (channels_last and compile
# reorder float sums, so they stay in the fingerprint: a resumed run never mixes the two.)
SPEED_ONLY = ("device", "threads")
# Keys that only make a job write more about itself.
DIAGNOSTIC_ONLY = ("step_log",)
# Evaluation keys that change how the work is split or which checkpoints are evaluated, not any outcome.
EVAL_LAYOUT_ONLY = ("shards", "checkpoints")
# Evaluation keys of the robustness curve only (its own job, rpat/jobs/curve.py): changing them does not redo eval.json.
EVAL_CURVE_ONLY = ("eps_grid",)
# Evaluation keys the perception analysis does not read.
PERCEPTION_UNUSED = ("autoattack", "cw_steps", "eps_grid")
# What a robustness curve's outcomes depend on besides its grid (the main evaluation's attacks and examples).
CURVE_KEYS = ("n_examples", "subset", "subset_seed", "pgd_steps", "cw_steps", "autoattack", "block_size", "eps_grid")


def _recipes_off(data: dict, train: dict, cell: dict) -> tuple[dict, dict, dict]:
    """The training recipes left out of the fingerprint while they are off, so cells trained before they
    existed keep their fingerprints (and are not retrained)."""
    train = {k: v for k, v in train.items() if k not in SPEED_ONLY + DIAGNOSTIC_ONLY}
    if train.get("sync_batchnorm", True):  # the default: one process's statistics, whatever the processes
        train.pop("sync_batchnorm", None)
    if train.get("weight_average", {}).get("kind") == "none":
        del train["weight_average"]
    if not train.get("awp", {}).get("enabled", True):
        del train["awp"]
    if train.get("eps_warmup_epochs") == 0:
        del train["eps_warmup_epochs"]
    if data.get("extra") is None:
        data = {k: v for k, v in data.items() if k not in ("extra", "extra_fraction")}
    if cell.get("recipe") == "plain":
        cell = {k: v for k, v in cell.items() if k != "recipe"}
    return data, train, cell


def defaults_of(cls) -> dict:
    """A settings class's defaults as a plain dict (nested settings included)."""
    return asdict(cls())


def build(cls, values: Mapping):
    """``cls(**values)``, building nested settings classes from their dicts."""
    kwargs = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        default = f.default_factory() if callable(f.default_factory) else None
        kwargs[f.name] = build(type(default), v) if is_dataclass(default) and isinstance(v, Mapping) else v
    return cls(**kwargs)


def fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CellSettings:
    """Everything one cell's jobs need, resolved once (``Config.settings(cell)``)."""

    cell: Cell
    experiment: str
    data: DataSettings
    threat: Threat
    train: TrainSettings
    method: Mapping[str, Any]  # the objective's hyperparameters, defaults filled in
    rpat: RpatSettings | None  # None: RPAT off for this cell
    eval: EvalSettings
    resources: Mapping[str, Any]
    resolved: dict  # the same, as the plain dict that train.json and MLflow's params record
    pretrained: bool = False  # the method loads its weights (rpat/objectives/pretrained.py): `train` does not apply
    run_name: str = ""  # the MLflow run's short name (rpat.cells.run_name); empty: the cell id

    @classmethod
    def from_resolved(cls, cell: Cell, resolved: dict, resources: Mapping, pretrained: bool = False,
                      run_name: str = "") -> "CellSettings":
        return cls(
            cell=cell,
            experiment=resolved["experiment"],
            data=build(DataSettings, resolved["data"]),
            threat=Threat(norm=cell.norm, **resolved["threat"][cell.norm]),
            train=build(TrainSettings, resolved["train"]),
            method=MappingProxyType(dict(resolved["methods"].get(cell.method, {}))),
            rpat=build(RpatSettings, resolved["rpat"]) if cell.rpat else None,
            eval=build(EvalSettings, resolved["eval"]),
            resources=MappingProxyType(dict(resources)),
            resolved=resolved,
            pretrained=pretrained,
            run_name=run_name,
        )

    def training_part(self) -> dict:
        """What determines a cell's training (not its evaluation, resources or speed-only keys); for a pretrained
        cell, what determines its weights and the evaluation's data and threat, but not the training recipe, so
        changing it for the grid's other cells does not re-evaluate zoo models."""
        r = self.resolved
        data, train, cell = _recipes_off(r["data"], r["train"], r["cell"])
        keys = {"cell": cell, "data": data, "threat": r["threat"][self.cell.norm],
                "method": r["methods"].get(self.cell.method, {})}
        if not self.pretrained:
            keys["train"] = train
        if self.cell.rpat:
            keys["rpat"] = r["rpat"]
        return keys

    @property
    def train_fingerprint(self) -> str:
        return fingerprint(self.training_part())

    @property
    def eval_fingerprint(self) -> str:
        """What determines a checkpoint's evaluation outcomes (not the sharding, not the list of checkpoints)."""
        measured = {k: v for k, v in self.resolved["eval"].items() if k not in EVAL_LAYOUT_ONLY + EVAL_CURVE_ONLY}
        return fingerprint({"eval": measured, "train": self.train_fingerprint})

    @property
    def perception_fingerprint(self) -> str:
        """What the perception analysis (rpat/jobs/perceive.py) depends on: the training and the eval keys it reads (not
        AutoAttack's, CW's or the robustness curve's)."""
        used = {k: v for k, v in self.resolved["eval"].items() if k not in PERCEPTION_UNUSED}
        return fingerprint({"eval": used, "train": self.train_fingerprint})

    @property
    def curve_fingerprint(self) -> str:
        """What determines the robustness curve's outcomes (rpat/jobs/curve.py): its grid, the attacks' settings, the
        evaluated examples, the primary checkpoint and the training."""
        e = self.resolved["eval"]
        used = {k: e.get(k) for k in CURVE_KEYS}
        return fingerprint({"eval": used, "checkpoint": e["checkpoints"][0], "train": self.train_fingerprint,
                            "threat": self.resolved["threat"]})
