"""Configuration: load YAML safely, validate it, expand the grid into cells, resolve each cell's settings.

A config has hyperparameter *sections* (data, threat, train, methods, rpat, eval, resources), named
``recipes`` (each a set of section overrides, docs/recipes.md) and a ``grid``: a list of blocks, each a
product dataset x model x norm x method x rpat x seed x recipe (``recipe`` defaults to ``[plain]``, no
overrides) with an optional ``set`` of section overrides. A *cell* is one point of that product; its settings
are ``DEFAULTS <- config sections <- block.set <- recipes[recipe]``, resolved once into
:class:`rpat.settings.CellSettings`.
Fractions such as ``"8/255"`` are accepted wherever a number is expected.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable

import yaml

from rpat import processes
from rpat import settings as S
from rpat import zoo
from rpat.catalog import catalog
from rpat.cells import PLAIN, Cell, CellError, CellFiles, block_cells, run_name, varying_axes
from rpat.errors import ConfigError, UnknownName
from rpat.evaluation import eps_grid
from rpat.schema import SECTIONS, problems

__all__ = ["Cell", "Config", "ConfigError", "DEFAULTS", "SECTIONS", "block_cells", "deep_merge", "from_dict", "load"]


def _method_defaults() -> dict:
    return {name: copy.deepcopy(o["defaults"]) for name, o in catalog()["objectives"].items() if o["defaults"]}


@functools.lru_cache(maxsize=1)
def defaults() -> dict[str, Any]:
    """The embedded defaults, built from the settings classes (rpat/settings.py) and the objectives' registry (on
    first use: the registry's catalog is read, or built, then)."""
    return {
        "results_dir": "results",
        "tracking": {"enabled": True, "uri": None, "log_model": True, "register_model": None},
        "data": S.defaults_of(S.DataSettings),
        "threat": copy.deepcopy(S.THREAT_DEFAULTS),
        "train": S.defaults_of(S.TrainSettings),
        "methods": _method_defaults(),
        "rpat": S.defaults_of(S.RpatSettings),
        "eval": S.defaults_of(S.EvalSettings),
        "resources": {"default": dict(S.RESOURCE_DEFAULTS), "by_model": {}, "by_dataset": {}},
    }


def __getattr__(name: str):
    if name == "DEFAULTS":  # ``rpat.config.DEFAULTS``: :func:`defaults`, built when first read
        return defaults()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader (no tags that build Python objects) that refuses a key given twice in one mapping,
    which plain YAML lets the later one win silently."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_problem(path: Path, err: yaml.YAMLError) -> ConfigError:
    """One line naming the file, the line and the fix."""
    mark = getattr(err, "problem_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if isinstance(err, yaml.constructor.ConstructorError):
        if problem.startswith("duplicate key"):
            return ConfigError(f"{where}: {problem} in one mapping (the later one would silently win); keep one")
        tag = problem.split("tag ", 1)[-1].strip("'").replace("tag:yaml.org,2002:", "!!")
        return ConfigError(f"{where}: the YAML tag {tag} is not allowed: configs are plain YAML (mappings, lists, "
                           "strings, numbers) and never build Python objects; remove the tag")
    context = getattr(err, "context", None)
    cmark = getattr(err, "context_mark", None)
    opened = f" ({context} opened at line {cmark.line + 1})" if context and cmark is not None else ""
    return ConfigError(f"{where}: YAML syntax error: {problem}{opened}; fix the indentation, brackets or quotes "
                       "there")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with path.open() as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise _yaml_problem(path, e) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level, not {type(data).__name__}")
    return data


_FRACTION = re.compile(r"^\s*[-+]?\d+(\.\d*)?\s*/\s*\d+(\.\d*)?\s*$")


def parse_numbers(obj: Any) -> Any:
    """Turn strings like ``"8/255"`` into floats, recursively."""
    if isinstance(obj, dict):
        return {k: parse_numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [parse_numbers(v) for v in obj]
    if isinstance(obj, str) and _FRACTION.match(obj):
        num, den = (Fraction(p.strip()) for p in obj.split("/"))
        if den == 0:
            raise ConfigError(f"{obj!r} divides by zero")
        return float(num / den)
    return obj


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def invalid(found: list[str]) -> ConfigError:
    """One problem on one line; several as a list, one per line."""
    found = list(dict.fromkeys(found))
    if len(found) == 1:
        return ConfigError(f"invalid config: {found[0]}")
    return ConfigError("invalid config:\n  - " + "\n  - ".join(found))


def validate(cfg: dict) -> None:
    """Raise ConfigError listing every schema violation (each names its key and the allowed values)."""
    found = problems(cfg)
    if found:
        raise invalid(found)


def resources_for(resolved: dict) -> dict:
    """default <- by_dataset[dataset] <- by_model[model]."""
    res = resolved["resources"]
    cell = resolved["cell"]
    out = dict(S.RESOURCE_DEFAULTS)
    out.update(res.get("default", {}))
    out.update(res.get("by_dataset", {}).get(cell["dataset"], {}))
    out.update(res.get("by_model", {}).get(cell["model"], {}))
    return out


@dataclass
class Config:
    raw: dict
    source: str
    _owner: dict = field(default_factory=dict, repr=False)  # cell -> index of its grid block
    _settings: dict = field(default_factory=dict, repr=False)
    _varying: tuple = ()  # the axes among dataset, model, norm whose values differ between cells

    def __post_init__(self):
        for i, block in enumerate(self.blocks()):
            for cell in block_cells(block):
                self._owner.setdefault(cell, i)
        self._varying = varying_axes(self._owner)

    @property
    def experiment(self) -> str:
        return self.raw["experiment"]

    @property
    def results_dir(self) -> str:
        return self.raw.get("results_dir", defaults()["results_dir"])

    @property
    def tracking(self) -> dict:
        return {**defaults()["tracking"], **self.raw.get("tracking", {})}

    def blocks(self) -> list[dict]:
        return self.raw["grid"]

    def recipes(self) -> dict:
        """The named recipes (section overrides); ``plain`` overrides nothing."""
        return {PLAIN: {}, **self.raw.get("recipes", {})}

    def cells(self) -> list[Cell]:
        """Every cell of every block, in grid order, without duplicates."""
        return list(self._owner)

    def cell(self, cell_id: str) -> Cell:
        """The grid's cell named ``cell_id`` (an error naming some of the grid's cells if it is not one)."""
        cell = Cell.parse(cell_id)
        if cell not in self._owner:
            names = [c.id for c in self.cells()]
            raise CellError(f"cell {cell.id} is not in the grid of {self.source}; cells: {', '.join(names[:8])}"
                            f"{' ...' if len(names) > 8 else ''}")
        return cell

    def block_of(self, cell: Cell) -> dict:
        if cell not in self._owner:
            raise ConfigError(f"cell {cell.id} is not in the grid of {self.source}")
        return self.blocks()[self._owner[cell]]

    def files(self, cell: Cell) -> CellFiles:
        """Every file of ``cell`` under the config's ``results_dir``."""
        return CellFiles.of(self.results_dir, cell)

    def run_dir(self, cell: Cell) -> Path:
        return self.files(cell).run

    def data_options(self, dataset: str) -> dict:
        """The data options a data set is prepared with: those of the grid's first cell on it (every cell on it
        reads the prepared data)."""
        cells = [c for c in self.cells() if c.dataset == dataset]
        if not cells:
            raise UnknownName(f"no cell of {self.source} uses dataset {dataset!r}")
        return self.settings(cells[0]).data.options()

    def resolve(self, cell: Cell) -> dict:
        """The cell's full settings as a plain dict: defaults <- top-level sections <- its block's ``set``."""
        base = {k: v for k, v in self.raw.items() if k in SECTIONS}
        resolved = deep_merge({k: defaults()[k] for k in SECTIONS}, base)
        resolved = deep_merge(resolved, self.block_of(cell).get("set", {}))
        resolved = deep_merge(resolved, self.recipes()[cell.recipe])
        resolved["cell"] = {**cell.tags(), "rpat": cell.rpat, "seed": cell.seed}
        resolved["experiment"] = self.experiment
        return resolved

    def settings(self, cell: Cell) -> S.CellSettings:
        """The cell's typed settings, resolved once per cell."""
        if cell not in self._settings:
            resolved = self.resolve(cell)
            pretrained = catalog()["objectives"].get(cell.method, {}).get("pretrained", False)
            self._settings[cell] = S.CellSettings.from_resolved(cell, resolved, resources_for(resolved), pretrained,
                                                                run_name(cell, self._varying))
        return self._settings[cell]


def recipe_problems(s: S.CellSettings, objectives: dict) -> list[str]:
    """Why the cell's recipes cannot run (``objectives``: the catalog's entries by name); empty if they can."""
    t, name, out = s.train, s.cell.method, []
    entry = objectives[name]
    if entry.get("pretrained"):  # a zoo model: not trained here
        return out
    if t.weight_average.kind != "none" and entry["uses_teacher"]:
        out.append(f"cell {s.cell.id}: {name} keeps its own weight average as its teacher (methods.{name}.decay "
                   f"and warmup_epoch); set train.weight_average.kind: none for it")
    if t.awp.enabled and not entry["supports_awp"]:
        able = ", ".join(n for n, o in objectives.items() if o["supports_awp"])
        out.append(f"cell {s.cell.id}: {name} does not take AWP (it perturbs weights against an adversarial "
                   f"training loss: {able}); set train.awp.enabled: false for it")
    if t.awp.enabled and t.awp.warmup >= t.epochs:
        out.append(f"cell {s.cell.id}: train.awp.warmup={t.awp.warmup} leaves no epoch with AWP "
                   f"(train.epochs={t.epochs}); lower it")
    if t.weight_average.kind == "swa" and t.weight_average.swa_start > t.epochs:
        out.append(f"cell {s.cell.id}: train.weight_average.swa_start={t.weight_average.swa_start} is after the "
                   f"last epoch ({t.epochs}); lower it")
    if t.eps_warmup_epochs > t.epochs:
        out.append(f"cell {s.cell.id}: train.eps_warmup_epochs={t.eps_warmup_epochs} exceeds train.epochs="
                   f"{t.epochs}: the full eps would never be trained")
    return out


def _check_semantics(cfg: Config) -> None:
    cat = catalog()
    objectives = cat["objectives"]
    problems_ = [f"grid[{i}].recipe: {r!r} is not defined; define it under `recipes:` (defined: "
                 f"{', '.join(cfg.recipes())})" for i, b in enumerate(cfg.blocks()) for r in b.get("recipe", [])
                 if r not in cfg.recipes()]
    if problems_:
        raise invalid(problems_)
    for i, block in enumerate(cfg.blocks()):
        for method in block["method"]:
            if True in block["rpat"] and not objectives[method]["supports_rpat"]:
                problems_.append(f"grid[{i}]: method {method!r} has no RPAT variant; use rpat: [false] for it "
                                 "or move it to a block of its own")
        for cell in block_cells(block):
            owner = cfg._owner[cell]
            if owner != i and cfg.blocks()[owner].get("set", {}) != block.get("set", {}):
                problems_.append(f"cell {cell.id} is in grid[{owner}] and grid[{i}] with different `set`; "
                                 "a cell must have one configuration")
    for cell in cfg.cells():
        if cell.norm not in cfg.resolve(cell)["threat"]:
            problems_.append(f"cell {cell.id}: no threat.{cell.norm} settings")
            continue
        s = cfg.settings(cell)
        problems_ += zoo.cell_problems(cell, s.method, cat)
        if s.rpat is not None and s.rpat.start_epoch > s.train.epochs:
            problems_.append(f"cell {cell.id}: rpat.start_epoch={s.rpat.start_epoch} is after the last epoch "
                             f"({s.train.epochs})")
        if s.data.cutmix.enabled and not objectives[cell.method]["mixed_targets"]:
            mixing = ", ".join(n for n, o in objectives.items() if o["mixed_targets"])
            problems_.append(f"cell {cell.id}: data.cutmix.enabled is on, but method {cell.method!r} needs integer "
                             f"labels (CutMix mixes them); CutMix works with: {mixing}; set data.cutmix.enabled: "
                             "false in this block's `set`")
        problems_ += recipe_problems(s, objectives)
        problems_ += [f"cell {cell.id}: {p}" for p in processes.resource_problems(s.resources, s.data.batch_size)]
        problems_ += eps_grid.problems(s.eval.eps_grid, cat["measurements"])
    if problems_:
        raise invalid(problems_)


def from_dict(raw: dict, source: str = "<dict>") -> Config:
    raw = parse_numbers(raw)
    validate(raw)
    cfg = Config(raw, source)
    _check_semantics(cfg)
    return cfg


def load(paths: str | Path | Iterable[str | Path]) -> Config:
    """Load, merge (later files override earlier ones) and validate config file(s)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    raw: dict = {}
    for p in paths:
        raw = deep_merge(raw, load_yaml(p))
    try:
        return from_dict(raw, ", ".join(map(str, paths)))
    except ConfigError as e:
        raise ConfigError(f"{', '.join(map(str, paths))}: {e}") from None
