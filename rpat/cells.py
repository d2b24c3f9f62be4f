"""A grid cell and where it lives: one pattern, one parser, used by the workflow and the CLI alike.

A cell is one point of a grid block's product dataset x model x norm x method x rpat x seed x recipe. Its
directory under ``<results_dir>/runs`` is :data:`PATTERN` filled with its coordinates, where ``method``
is the method's label: the method, ``+rpat`` when RPAT is on, and ``+<recipe>`` unless the recipe is
``plain`` (``trades``, ``trades+rpat``, ``trades+rpat+ema``), so cells without a recipe keep their paths.
The Snakemake rules use :data:`PATTERN` as their wildcard pattern and :meth:`Cell.from_wildcards` to read a
cell back; the CLI uses :meth:`Cell.parse`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from rpat.errors import ConfigError

PATTERN = "{dataset}/{model}/{norm}/{method}/seed{seed}"
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


def run_dir(results_dir: str | Path, cell: Cell) -> Path:
    """``<results_dir>/runs/<cell id>``: where a cell's jobs write, unless told another directory."""
    return Path(results_dir) / "runs" / cell.id


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
