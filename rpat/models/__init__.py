"""Model registry.

Every model is registered once with :func:`register`; :func:`build` returns it wrapped in
:class:`Normalized`, so attacks and AutoAttack always see inputs in [0, 1] (docs/faithfulness.md D7).

A builder takes ``(num_classes, in_channels, image_size)`` and returns an ``nn.Module`` mapping
normalised images to logits.

Pretrained RobustBench entries are not registered here: a grid names them ``robustbench:<entry>``
(:mod:`rpat.zoo`), :mod:`rpat.models.robustbench` loads them, and :func:`build_from_meta` rebuilds them from
a checkpoint that records their ``zoo_entry``.
"""

from __future__ import annotations

from rpat.models.registry import (  # noqa: F401 - the package's API
    META_KEYS, MODELS, ModelSpec, Normalized, build, meta, param_count, register,
)

# Importing the modules registers their models.
from rpat.models import cnn, preact_resnet, resnet, wide_resnet  # noqa: F401
from rpat.models import robustbench  # noqa: F401  (pretrained RobustBench entries, `robustbench:<entry>`)


def build_from_meta(m: dict) -> Normalized:
    """The model a checkpoint's :func:`meta` describes (a RobustBench entry's where it records ``zoo_entry``)."""
    if "zoo_entry" in m:
        return robustbench.build_from_meta(m)
    return build(m["model_name"], num_classes=m["num_classes"], in_channels=m["in_channels"],
                 image_size=m["image_size"], mean=m["mean"], std=m["std"])
