"""Configuration: load YAML safely, validate against the JSON schema, expand the grid into cells.

A config has hyperparameter *sections* (data, threat, train, methods, rpat, eval, resources) and a
``grid``: a list of blocks, each a product dataset x model x norm x method x rpat x seed with an
optional ``set`` of section overrides. A *cell* is one point of that product; its resolved config is
``DEFAULTS <- config sections <- block.set``. Fractions such as ``"8/255"`` are accepted wherever a
number is expected.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

from rpat.errors import UserError

SECTIONS = ("data", "threat", "train", "methods", "rpat", "eval", "resources")

# Embedded defaults: the paper's Benchmarks recipe (REFERENCE.md 5.1, DECISIONS.md 9-15).
DEFAULTS: dict[str, Any] = {
    "results_dir": "results",
    "tracking": {"enabled": True, "uri": None},
    "data": {
        "root": "data",
        "paths": {},
        "download": False,
        "val_size": 1000,
        "split_seed": 0,
        "train_subset": None,
        "subset": "stratified",
        "augment": "crop_flip",
        "batch_size": 128,
        "eval_batch_size": 500,
    },
    "threat": {
        "linf": {"eps": 8 / 255, "step": 2 / 255, "steps": 10},
        "l2": {"eps": 128 / 255, "step": 15 / 255, "steps": 10},
    },
    "train": {
        "epochs": 110,
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": {"name": "multistep", "milestones": [100, 105], "gamma": 0.1},
        "select": "val",
        "val_attack_steps": 10,
        "device": "auto",
        "threads": None,
        "precision": "float32",
        "channels_last": False,
        "compile": False,
    },
    "methods": {},  # filled from each objective's defaults below
    "rpat": {"weight": 1.0, "clean_weight": 0.5, "start_epoch": 1},
    "eval": {
        "checkpoint": "best",
        "n_examples": None,
        "subset": "stratified",
        "subset_seed": 0,
        "batch_size": 500,
        "pgd_steps": 20,
        "cw_steps": 30,
        "autoattack": {"enabled": True, "version": "standard", "seed": 0},
    },
    "resources": {
        "default": {"gpu": 0, "cpus": 1, "mem_mb": 4000, "runtime": 60},
        "by_model": {},
        "by_dataset": {},
    },
}


def _method_defaults() -> dict:
    from rpat.catalog import catalog

    return {name: copy.deepcopy(o["defaults"]) for name, o in catalog()["objectives"].items() if o["defaults"]}


DEFAULTS["methods"] = _method_defaults()


def _schema_of(value: Any, key: str = "") -> dict:
    """A schema accepting values shaped like ``value`` (a method's default hyperparameter)."""
    from rpat.catalog import catalog

    if key.endswith("_bn"):
        return {"type": "string", "enum": catalog()["bn_modes"]}
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, (int, float)):
        return {"type": "number", "minimum": 0}
    if isinstance(value, dict):
        return {"type": "object", "additionalProperties": False,
                "properties": {k: _schema_of(v, k) for k, v in value.items()}}
    return {"type": "string"}


class ConfigError(UserError, ValueError):
    """A config problem, with the key that is wrong and what would be right."""


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with path.open() as f:
        data = yaml.safe_load(f)
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


def schema() -> dict:
    """The JSON schema with the registries' names filled in."""
    from rpat.catalog import catalog

    cat = catalog()
    text = resources.files("rpat").joinpath("config.schema.yaml").read_text()
    s = yaml.safe_load(text)
    block = s["properties"]["grid"]["items"]["properties"]
    for key, names in (
        ("dataset", cat["datasets"]),
        ("model", cat["models"]),
        ("norm", cat["norms"]),
        ("method", cat["objectives"]),
    ):
        block[key] = {**block[key], "items": {"type": "string", "enum": sorted(names) if key != "norm" else names}}
    block["set"]["properties"] = {k: {"$ref": f"#/$defs/sections/{k}"} for k in SECTIONS}
    s["$defs"]["sections"]["methods"]["properties"] = {
        name: _schema_of(defaults) for name, defaults in DEFAULTS["methods"].items()}
    return s


def _path(error) -> str:
    parts = []
    for p in error.absolute_path:
        parts.append(f"[{p}]" if isinstance(p, int) else (f".{p}" if parts else str(p)))
    return "".join(parts) or "<top level>"


def _describe(error) -> str:
    key = _path(error)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        return f"unknown key {', '.join(map(repr, extra))} in {key}; allowed keys: {', '.join(allowed)}"
    if error.validator == "enum":
        return f"{key}: {error.instance!r} is not allowed; allowed values: {', '.join(map(str, error.validator_value))}"
    if error.validator == "required":
        return f"{key}: {error.message}"
    return f"{key}: {error.message}"


def validate(cfg: dict) -> None:
    """Raise ConfigError listing every schema violation (each names its key and the allowed values)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = "\n  - ".join(_describe(e) for e in errors)
        raise ConfigError(f"invalid config:\n  - {lines}")


# ---------------------------------------------------------------------------------------------


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
        return f"{self.method}+rpat" if self.rpat else self.method

    @property
    def id(self) -> str:
        """Also the cell's directory under ``<results_dir>/runs``."""
        return f"{self.dataset}/{self.model}/{self.norm}/{self.method_label}/seed{self.seed}"

    def tags(self) -> dict[str, str]:
        return {"dataset": self.dataset, "model": self.model, "norm": self.norm, "method": self.method,
                "rpat": "on" if self.rpat else "off", "seed": str(self.seed), "cell": self.id}

    @classmethod
    def parse(cls, cell_id: str) -> "Cell":
        m = re.fullmatch(r"([^/]+)/([^/]+)/([^/]+)/([^/+]+?)(\+rpat)?/seed(\d+)", cell_id.strip("/"))
        if not m:
            raise ConfigError(f"cell {cell_id!r} is not of the form dataset/model/norm/method[+rpat]/seedN")
        return cls(m[1], m[2], m[3], m[4], m[5] is not None, int(m[6]))


GRID_KEYS = ("dataset", "model", "norm", "method", "rpat", "seed")  # Cell's fields, in order


def block_cells(block: dict) -> Iterator[Cell]:
    """The cells of one grid block: the product of its coordinate lists."""
    return (Cell(*combo) for combo in itertools.product(*(block[k] for k in GRID_KEYS)))


@dataclass
class Config:
    raw: dict
    source: str

    @property
    def experiment(self) -> str:
        return self.raw["experiment"]

    @property
    def results_dir(self) -> str:
        return self.raw.get("results_dir", DEFAULTS["results_dir"])

    @property
    def tracking(self) -> dict:
        return {**DEFAULTS["tracking"], **self.raw.get("tracking", {})}

    def blocks(self) -> list[dict]:
        return self.raw["grid"]

    def cells(self) -> list[Cell]:
        """Every cell of every block, in grid order, without duplicates."""
        return list(dict.fromkeys(cell for block in self.blocks() for cell in block_cells(block)))

    def block_of(self, cell: Cell) -> dict:
        for block in self.blocks():
            if cell in block_cells(block):
                return block
        raise ConfigError(f"cell {cell.id} is not in the grid of {self.source}")

    def resolve(self, cell: Cell) -> dict:
        """The cell's full settings: defaults <- top-level sections <- its block's ``set``."""
        base = {k: v for k, v in self.raw.items() if k in SECTIONS}
        resolved = deep_merge({k: DEFAULTS[k] for k in SECTIONS}, base)
        resolved = deep_merge(resolved, self.block_of(cell).get("set", {}))
        resolved["cell"] = {**cell.tags(), "rpat": cell.rpat, "seed": cell.seed}
        resolved["experiment"] = self.experiment
        return resolved


def _check_semantics(cfg: Config) -> None:
    from rpat.catalog import catalog

    objectives = catalog()["objectives"]
    problems = []
    for i, block in enumerate(cfg.blocks()):
        for method in block["method"]:
            if True in block["rpat"] and not objectives[method]["supports_rpat"]:
                problems.append(f"grid[{i}]: method {method!r} has no RPAT variant; use rpat: [false] for it "
                                "or move it to a block of its own")
    owners: dict[Cell, int] = {}
    for i, block in enumerate(cfg.blocks()):
        for cell in block_cells(block):
            if cell in owners and cfg.blocks()[owners[cell]].get("set", {}) != block.get("set", {}):
                problems.append(f"cell {cell.id} is in grid[{owners[cell]}] and grid[{i}] with different `set`; "
                                "a cell must have one configuration")
            owners.setdefault(cell, i)
    for cell in cfg.cells():
        r = cfg.resolve(cell)
        if cell.norm not in r["threat"]:
            problems.append(f"cell {cell.id}: no threat.{cell.norm} settings")
        if r["rpat"]["start_epoch"] > r["train"]["epochs"] and cell.rpat:
            problems.append(f"cell {cell.id}: rpat.start_epoch={r['rpat']['start_epoch']} is after the last epoch "
                            f"({r['train']['epochs']})")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(dict.fromkeys(problems)))


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


def fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Keys that change where and how fast a job runs, not what it computes. (channels_last and compile
# reorder float sums, so they stay in the fingerprint: a resumed run never mixes the two.)
SPEED_ONLY = ("device", "threads")


def train_settings(resolved: dict) -> dict:
    """The part of a cell's settings that determines its training (not evaluation or resources)."""
    cell = resolved["cell"]
    keys = {"cell": cell, "data": resolved["data"], "threat": resolved["threat"][cell["norm"]],
            "train": {k: v for k, v in resolved["train"].items() if k not in SPEED_ONLY},
            "method": resolved["methods"].get(cell["method"], {})}
    if cell["rpat"]:
        keys["rpat"] = resolved["rpat"]
    return keys


def resources_for(resolved: dict) -> dict:
    """default <- by_dataset[dataset] <- by_model[model]."""
    res = resolved["resources"]
    cell = resolved["cell"]
    out = dict(DEFAULTS["resources"]["default"])
    out.update(res.get("default", {}))
    out.update(res.get("by_dataset", {}).get(cell["dataset"], {}))
    out.update(res.get("by_model", {}).get(cell["model"], {}))
    return out
