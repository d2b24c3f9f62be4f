"""A grid cell and where it lives: one pattern, one parser, used by the workflow and the CLI alike.

A cell is one point of a grid block's product dataset x model x norm x method x rpat x seed x recipe. Its
directory under ``<results_dir>/runs`` is :data:`PATTERN` filled with its coordinates, where ``method``
is the method's label: the method, ``+rpat`` when RPAT is on, and ``+<recipe>`` unless the recipe is
``plain`` (``trades``, ``trades+rpat``, ``trades+rpat+ema``), so cells without a recipe keep their paths.
The Snakemake rules use :data:`PATTERN` as their wildcard pattern and :meth:`Cell.from_wildcards` to read a
cell back; the CLI uses :meth:`Cell.parse`. :class:`CellFiles` names every file of a cell (the only place that
does).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from rpat.errors import ConfigError

PATTERN = "{dataset}/{model}/{norm}/{method}/seed{seed}"
RUNS, LOGS = "runs", "logs"  # under <results_dir>: the cells' run directories, the jobs' logs (CellFiles)
GRID_KEYS = ("dataset", "model", "norm", "method", "rpat", "seed", "recipe")  # Cell's fields, in order
GRID_DEFAULTS = {"recipe": ["plain"]}  # grid keys a block may leave out
RPAT_SUFFIX = "+rpat"
PLAIN = "plain"  # the recipe that changes nothing
RECIPE_NAME = r"[a-z0-9][a-z0-9_-]*"  # a recipe's name; "rpat" is not one (that suffix means RPAT)
NAMED_AXES = ("dataset", "model", "norm")  # in a run's name only where the experiment's cells differ in them
_PARSE = re.compile(rf"([^/]+)/([^/]+)/([^/]+)/([^/+]+?)(\+rpat)?(?:\+(?!(?:rpat|plain)/)({RECIPE_NAME}))?/seed(\d+)")


class CellError(ConfigError):
    """A cell id that is malformed or not in the config's grid."""


@dataclass(frozen=True, order=True)
class Cell:
    dataset: str
    model: str
    norm: str
    method: str
    rpat: bool
    seed: int
    recipe: str = PLAIN

    @property
    def method_label(self) -> str:
        label = f"{self.method}{RPAT_SUFFIX}" if self.rpat else self.method
        return label if self.recipe == PLAIN else f"{label}+{self.recipe}"

    @property
    def id(self) -> str:
        """The cell's name, which is also its directory under ``<results_dir>/runs``."""
        return PATTERN.format(dataset=self.dataset, model=self.model, norm=self.norm, method=self.method_label,
                              seed=self.seed)

    def tags(self) -> dict[str, str]:
        return {"dataset": self.dataset, "model": self.model, "norm": self.norm, "method": self.method,
                "rpat": "on" if self.rpat else "off", "seed": str(self.seed), "recipe": self.recipe, "cell": self.id}

    def coordinates(self) -> dict:
        """The grid coordinates with their native types (what result files record)."""
        return {"dataset": self.dataset, "model": self.model, "norm": self.norm, "method": self.method,
                "rpat": self.rpat, "seed": self.seed, "recipe": self.recipe}

    @classmethod
    def parse(cls, cell_id: str) -> "Cell":
        m = _PARSE.fullmatch(cell_id.strip("/"))
        if not m:
            raise CellError(f"cell {cell_id!r} is not of the form dataset/model/norm/method[+rpat][+recipe]/seedN")
        return cls(m[1], m[2], m[3], m[4], m[5] is not None, int(m[7]), m[6] or PLAIN)

    @classmethod
    def from_wildcards(cls, wildcards: Mapping) -> "Cell":
        """The cell of a Snakemake job whose output pattern is :data:`PATTERN`."""
        return cls.parse(PATTERN.format(**{k: wildcards[k] for k in ("dataset", "model", "norm", "method", "seed")}))


@dataclass(frozen=True)
class CellFiles:
    """Every file of one cell, named in this one place: its run directory ``<results_dir>/runs/<cell id>`` and
    what the jobs write there, and the jobs' logs under ``<results_dir>/logs``.

    In the run directory: ``train.json`` (the training record, written last), ``checkpoint-<c>.pt``,
    ``progress.json`` and ``state/`` (training, while it runs); per evaluated checkpoint ``c`` of
    ``eval.checkpoints`` an evaluation and its per-example outcomes, ``eval.json`` + ``outcomes.npz`` for the
    first (the *primary* one) and ``eval-<c>.json`` + ``outcomes-<c>.npz`` for any other (the file's *tag* is
    ``""`` or ``-<c>``); ``eval-shards/`` (the shard jobs' results) and ``eval-state/`` (saved evaluation
    progress); ``perception.json`` + ``.npz`` and ``curve.json`` + ``.npz``. Any argument may be a Snakemake
    wildcard (``"{which}"``): :meth:`pattern` names the files of every cell at once, for the workflow's rules.
    """

    run: Path
    cell_id: str | None = None  # None for a run directory given by hand: it has no logs
    logs: Path | None = None

    def __post_init__(self):
        object.__setattr__(self, "run", Path(self.run))
        if self.logs is not None:
            object.__setattr__(self, "logs", Path(self.logs))

    @classmethod
    def of(cls, results_dir: str | Path, cell: Cell) -> "CellFiles":
        """The files of ``cell`` under ``results_dir``."""
        return cls._under(results_dir, cell.id)

    @classmethod
    def pattern(cls, results_dir: str | Path) -> "CellFiles":
        """The files of any cell, as Snakemake patterns (:data:`PATTERN`'s wildcards)."""
        return cls._under(results_dir, PATTERN)

    @classmethod
    def _under(cls, results_dir: str | Path, cell_id: str) -> "CellFiles":
        results = Path(results_dir)
        return cls(results / RUNS / cell_id, cell_id, results / LOGS)

    @classmethod
    def beside(cls, path: str | Path) -> "CellFiles":
        """The files of the run directory that holds ``path`` (a result file given by hand)."""
        return cls(Path(path).parent)

    # training
    @property
    def train_record(self) -> Path:
        return self.run / "train.json"

    @property
    def progress(self) -> Path:
        return self.run / "progress.json"

    @property
    def training_state(self) -> Path:
        return self.run / "state"

    @property
    def training_state_file(self) -> Path:
        """The state a training job resumes from (saved every epoch and on a stop signal)."""
        return self.training_state / "last.pt"

    @property
    def best_so_far(self) -> Path:
        """The best checkpoint while training runs; copied to ``checkpoint-best.pt`` when it ends."""
        return self.training_state / "best.pt"

    @property
    def step_log(self) -> Path:
        """Every training step's loss parts (``train.step_log``), one JSON line each."""
        return self.run / "steps.jsonl"

    @staticmethod
    def checkpoint_name(which: str) -> str:
        """A checkpoint's file name, as ``train.json`` lists it (relative to the run directory)."""
        return f"checkpoint-{which}.pt"

    def checkpoint(self, which: str) -> Path:
        return self.run / self.checkpoint_name(which)

    # evaluation
    @staticmethod
    def tag(which: str, primary: str) -> str:
        """``""`` for the primary checkpoint, ``-<which>`` for another."""
        return "" if which == primary else f"-{which}"

    @staticmethod
    def checkpoint_of_tag(tag: str, primary: str) -> str:
        """The checkpoint an evaluation's tag names (:meth:`tag` reversed)."""
        return tag[1:] if tag else primary

    def evaluation(self, which: str, primary: str) -> Path:
        """The evaluation of checkpoint ``which``, ``primary`` being the first of ``eval.checkpoints``."""
        return self.tagged_evaluation(self.tag(which, primary))

    @property
    def primary_evaluation(self) -> Path:
        """The evaluation of the primary checkpoint, whichever that is."""
        return self.tagged_evaluation("")

    def outcomes(self, which: str, primary: str) -> Path:
        return self.tagged_outcomes(self.tag(which, primary))

    def tagged_evaluation(self, tag: str) -> Path:
        return self.run / f"eval{tag}.json"

    def tagged_outcomes(self, tag: str) -> Path:
        return self.run / f"outcomes{tag}.npz"

    @staticmethod
    def outcomes_beside(result: str | Path) -> Path:
        """The per-example outcomes that go with a result file: an evaluation's (:meth:`outcomes`), else the
        result's ``.npz`` twin (a shard's, a curve's)."""
        p = Path(result)
        if p.name.startswith("eval") and p.suffix == ".json":
            return p.with_name("outcomes" + p.name[len("eval"):-len(".json")] + ".npz")
        return p.with_suffix(".npz")

    def shard_result(self, which: str, shard, shards) -> Path:
        return self.run / "eval-shards" / f"{which}-{shard}of{shards}.json"

    def shard_outcomes(self, which: str, shard, shards) -> Path:
        return self.outcomes_beside(self.shard_result(which, shard, shards))

    @property
    def evaluation_state_dir(self) -> Path:
        return self.run / "eval-state"

    def evaluation_state(self, which: str, shard: int = 1, shards: int = 1) -> Path:
        """Saved progress of one checkpoint's evaluation (of one shard of it)."""
        return self.evaluation_state_dir / (f"{which}.pt" if shards == 1 else f"{which}-{shard}of{shards}.pt")

    def curve_state(self, which: str) -> Path:
        return self.evaluation_state_dir / f"curve-{which}.pt"

    # perception and the robustness curve
    @property
    def perception(self) -> Path:
        return self.run / "perception.json"

    @property
    def perception_values(self) -> Path:
        return self.perception.with_suffix(".npz")

    @property
    def curve(self) -> Path:
        return self.run / "curve.json"

    @property
    def curve_outcomes(self) -> Path:
        return self.outcomes_beside(self.curve)

    # logs
    def log(self, rule: str, suffix: str = "") -> Path:
        """The log of the cell's ``rule`` job: ``<results_dir>/logs/<rule>/<cell id><suffix>.log``."""
        if self.logs is None or self.cell_id is None:
            raise ValueError(f"{self!r}: a run directory given by hand has no logs; name the cell's files with "
                             "CellFiles.of")
        return self.logs / rule / f"{self.cell_id}{suffix}.log"

    def evaluation_logs(self) -> list[Path]:
        """evaluate's logs: ``seed<N>.log``, ``seed<N>-<checkpoint>.log`` and the shards'
        ``seed<N>-<c>-<i>of<n>.log``."""
        primary = self.log("evaluate")
        if not primary.parent.is_dir():
            return []
        return sorted(p for p in primary.parent.iterdir()
                      if p.name == primary.name or (p.name.startswith(f"{primary.stem}-") and p.suffix == ".log"))


def block_cells(block: dict) -> Iterator[Cell]:
    """The cells of one grid block: the product of its coordinate lists."""
    axes = (block.get(k, GRID_DEFAULTS.get(k)) for k in GRID_KEYS)
    return (Cell(*combo) for combo in itertools.product(*axes))


def varying_axes(cells: Iterable[Cell]) -> tuple[str, ...]:
    """Which of dataset, model and norm take more than one value among ``cells``."""
    cells = list(cells)
    return tuple(a for a in NAMED_AXES if len({getattr(c, a) for c in cells}) > 1)


def run_name(cell: Cell, varying: Iterable[str] = NAMED_AXES) -> str:
    """The cell's short MLflow run name: its coordinates among ``varying`` (see :func:`varying_axes`), method
    label and seed, e.g. ``trades+rpat s0`` or ``cifar10 trades+rpat s0``. Two cells of one grid never share it:
    they differ in a varying axis, the method label (method, RPAT, recipe) or the seed."""
    varying = set(varying)
    return " ".join([*(getattr(cell, a) for a in NAMED_AXES if a in varying), cell.method_label, f"s{cell.seed}"])
