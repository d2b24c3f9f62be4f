"""The config's JSON schema, completed from the registries, and validation messages that name the key.

``rpat/config.schema.yaml`` holds the structure; the names a key may take (datasets, models, norms,
methods, augmentations, schedules, BatchNorm modes) and the methods' hyperparameters are filled in from
the registries' catalog, so a new registry entry is valid in configs without editing the schema.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any, Iterator

import yaml

SECTIONS = ("data", "threat", "train", "methods", "rpat", "eval", "resources")


def _schema_of(value: Any, key: str, bn_modes: list[str], choices: dict | None = None, help: dict | None = None,
               path: str = "") -> dict:
    """A schema accepting values shaped like ``value`` (a method's default hyperparameter at ``path`` in its
    defaults, dotted); ``choices``: the objective's allowed values of its string hyperparameters; ``help``: its
    descriptions by path."""
    out = _shape_of(value, key, bn_modes, choices, help or {}, path)
    if (help or {}).get(path):
        out["description"] = help[path]
    return out


def _shape_of(value: Any, key: str, bn_modes: list[str], choices: dict | None, help: dict, path: str) -> dict:
    if choices and key in choices:
        return _enum(choices[key])
    if value is None:  # an optional setting (None: derived from the cell)
        return {"type": ["string", "null"]}
    if key.endswith("_bn"):
        return {"type": "string", "enum": bn_modes}
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, (int, float)):
        return {"type": "number", "minimum": 0}
    if isinstance(value, dict):
        return {"type": "object", "additionalProperties": False,
                "properties": {k: _schema_of(v, k, bn_modes, choices, help, f"{path}.{k}".lstrip("."))
                               for k, v in value.items()}}
    return {"type": "string"}


def _enum(names) -> dict:
    return {"type": "string", "enum": list(names)}


def schema() -> dict:
    """The JSON schema with the registries' names filled in."""
    from rpat.catalog import catalog

    cat = catalog()
    s = yaml.safe_load(resources.files("rpat").joinpath("config.schema.yaml").read_text())
    block = s["properties"]["grid"]["items"]["properties"]
    for key, names in (("dataset", sorted(cat["datasets"])), ("model", sorted(cat["models"])),
                       ("norm", cat["norms"]), ("method", sorted(cat["objectives"]))):
        block[key] = {**block[key], "items": _enum(names)}
    block["set"]["properties"] = {k: {"$ref": f"#/$defs/sections/{k}"} for k in SECTIONS}
    s["properties"]["recipes"]["additionalProperties"]["properties"] = dict(block["set"]["properties"])
    sections = s["$defs"]["sections"]
    sections["data"]["properties"]["augment"].update(_enum(sorted(cat["augmentations"])))
    for section in ("data", "eval"):
        sections[section]["properties"]["subset"]["enum"] = list(cat["subsets"])
    sections["train"]["properties"]["schedule"]["properties"]["name"].update(_enum(cat["schedules"]))
    sections["threat"]["properties"] = {norm: {"$ref": "#/$defs/threat"} for norm in cat["norms"]}
    curve = sections["eval"]["properties"]["eps_grid"]["items"]["properties"]
    curve["attacks"]["items"] = _enum(m["key"] for m in cat["measurements"] if m.get("norms"))
    sections["methods"]["properties"] = {
        name: {**_schema_of(o["defaults"], name, cat["bn_modes"], o["choices"], o.get("help")),
               "description": f"{o['display']}'s hyperparameters"}
        for name, o in cat["objectives"].items() if o["defaults"]}
    return s


def _path(parts) -> str:
    out = []
    for p in parts:
        out.append(f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p)))
    return "".join(out) or "<top level>"


def _describe(error) -> str:
    key = _path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        return f"unknown key {', '.join(map(repr, extra))} in {key}; allowed keys: {', '.join(allowed)}"
    if error.validator == "not" and "enum" in error.validator_value:
        return f"{key}: {error.instance!r} is reserved; reserved names: {', '.join(error.validator_value['enum'])}"
    if error.validator == "enum":
        return f"{key}: {error.instance!r} is not allowed; allowed values: {', '.join(map(str, error.validator_value))}"
    if error.validator == "exclusiveMinimum":
        return f"{key}: {error.instance!r} must be greater than {error.validator_value}"
    return f"{key}: {error.message}"


def _non_finite(obj: Any, parts: tuple = ()) -> Iterator[tuple[str, float]]:
    """Keys holding NaN or ±Inf (JSON schema's bounds let NaN through: every comparison with it is false)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _non_finite(v, parts + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _non_finite(v, parts + (i,))
    elif isinstance(obj, float) and not math.isfinite(obj):
        yield _path(parts), obj


def problems(cfg: dict) -> list[str]:
    """Every schema violation, each naming its key and the allowed values; a non-finite number is reported as
    that alone (not also as out of bounds)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(map(str, e.absolute_path)))
    non_finite = dict(_non_finite(cfg))
    found = [f"{key}: {value!r} is not a finite number; give a number such as 0.1 or 8/255"
             for key, value in non_finite.items()]
    found += [_describe(e) for e in errors if _path(e.absolute_path) not in non_finite]
    return list(dict.fromkeys(found))
