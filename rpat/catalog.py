"""What the registries hold (names, method defaults), without importing torch when it can be avoided.

Planning a grid (``snakemake -n``) validates the config against the registered datasets, models,
norms and methods; importing the registries costs a torch import (~2 s). The catalog is snapshotted
to a JSON file keyed by the library's source files (paths, sizes, mtimes), so it is rebuilt whenever
the code changes and read without torch otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def _source_key() -> str:
    h = hashlib.sha256()
    for p in sorted(PACKAGE.rglob("*.py")):
        st = p.stat()
        h.update(f"{p.relative_to(PACKAGE)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:20]


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rpat"


def build() -> dict:
    """Import the registries and list them (names, defaults, display names, measurements)."""
    from rpat import attacks, data, models, objectives, schedules
    from rpat.evaluation.measurements import DERIVED, MEASUREMENTS

    zoo = models.robustbench.catalog_entries()
    metric = lambda m: {"key": m.key, "header": m.header, "description": m.description, "paper": m.paper}  # noqa: E731
    return {
        "datasets": sorted(data.DATASETS),
        "datasets_on_disk": sorted(n for n, d in data.DATASETS.items() if d.on_disk),
        "models": sorted(models.MODELS) + sorted(zoo),
        "pretrained_models": zoo,  # robustbench:<entry> -> its "<dataset>/<threat model>" pairs (rpat/zoo.py)
        "norms": list(attacks.NORMS),
        "bn_modes": list(attacks.BN_MODES),
        "augmentations": sorted(data.AUGMENTATIONS),
        "subsets": list(data.SUBSETS),
        "schedules": list(schedules.SCHEDULES),
        "objectives": {name: {"defaults": o.defaults, "supports_rpat": o.supports_rpat, "display": o.label(False),
                              "rpat_display": o.label(True), "pretrained": o.provide is not None,
                              "mixed_targets": o.mixed_targets, "choices": o.choices, "uses_teacher": o.uses_teacher,
                              "supports_awp": o.supports_awp, "help": o.help}
                       for name, o in objectives.OBJECTIVES.items()},
        "measurements": [metric(m) | {"norms": list(m.norms)} for m in MEASUREMENTS.values()],
        "derived": [metric(d) for d in DERIVED.values()],
        "display": {
            "dataset": {n: d.display for n, d in data.DATASETS.items()},
            "model": {**{n: m.display for n, m in models.MODELS.items()}, **{n: n for n in zoo}},
            "norm": dict(attacks.NORM_DISPLAY),
        },
    }


@lru_cache(maxsize=1)
def catalog() -> dict:
    path = _cache_dir() / f"catalog-{_source_key()}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    snap = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(snap))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: fine, just slower next time
    return snap
