"""A grid cell and where it lives: one pattern, one parser, used by the workflow and the CLI alike.

A cell is one point of a grid block's product dataset x model x norm x method x rpat x seed. Its
directory under ``<results_dir>/runs`` is :data:`PATTERN` filled with its coordinates, where ``method``
is the method's label (``trades`` or ``trades+rpat``). The Snakemake rules use :data:`PATTERN` as their
wildcard pattern and :meth:`Cell.from_wildcards` to read a cell back; the CLI uses :meth:`Cell.parse`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from rpat.errors import ConfigError

PATTERN = "{dataset}/{model}/{norm}/{method}/seed{seed}"
GRID_KEYS = ("dataset", "model", "norm", "method", "rpat", "seed")  # Cell's fields, in order
RPAT_SUFFIX = "+rpat"
_PARSE = re.compile(r"([^/]+)/([^/]+)/([^/]+)/([^/+]+?)(\+rpat)?/seed(\d+)")


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

    @property
    def method_label(self) -> str:
        return f"{self.method}{RPAT_SUFFIX}" if self.rpat else self.method

    @property
    def id(self) -> str:
        """The cell's name, which is also its directory under ``<results_dir>/runs``."""
        return PATTERN.format(dataset=self.dataset, model=self.model, norm=self.norm, method=self.method_label,
                              seed=self.seed)

    def tags(self) -> dict[str, str]:
        return {"dataset": self.dataset, "model": self.model, "norm": self.norm, "method": self.method,
                "rpat": "on" if self.rpat else "off", "seed": str(self.seed), "cell": self.id}

    def coordinates(self) -> dict:
        """The grid coordinates with their native types (what result files record)."""
        return {"dataset": self.dataset, "model": self.model, "norm": self.norm, "method": self.method,
                "rpat": self.rpat, "seed": self.seed}

    @classmethod
    def parse(cls, cell_id: str) -> "Cell":
        m = _PARSE.fullmatch(cell_id.strip("/"))
        if not m:
            raise CellError(f"cell {cell_id!r} is not of the form dataset/model/norm/method[+rpat]/seedN")
        return cls(m[1], m[2], m[3], m[4], m[5] is not None, int(m[6]))

    @classmethod
    def from_wildcards(cls, wildcards: Mapping) -> "Cell":
        """The cell of a Snakemake job whose output pattern is :data:`PATTERN`."""
        return cls.parse(PATTERN.format(**{k: wildcards[k] for k in ("dataset", "model", "norm", "method", "seed")}))


def run_dir(results_dir: str | Path, cell: Cell) -> Path:
    """``<results_dir>/runs/<cell id>``: where a cell's jobs write, unless told another directory."""
    return Path(results_dir) / "runs" / cell.id


def block_cells(block: dict) -> Iterator[Cell]:
    """The cells of one grid block: the product of its coordinate lists."""
    return (Cell(*combo) for combo in itertools.product(*(block[k] for k in GRID_KEYS)))
