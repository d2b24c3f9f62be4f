"""RobustBench model-zoo entries, loaded from a local RobustBench model directory.

Why rpat reads the zoo's files itself: the ``robustbench`` package on PyPI (1.1.1, the newest there) installs
beside the project's pins, but ``import robustbench`` fails. Its ``__init__`` imports ``robustbench.eval``, which
imports the module ``autoattack``; only the GitHub build of AutoAttack provides that name, while the PyPI
``pyautoattack`` that robustbench 1.1.1 declares installs as ``pyautoattack``. Its ``loaders`` module also imports
``pkg_resources``, which setuptools 81 and later no longer ship. So this module reads the zoo's on-disk format with
architectures that have the zoo's state_dict keys and forward pass (tests/test_robustbench.py pins their
parameter counts, and their logits on seeded weights, to those of the zoo's own classes).

On-disk layout, as RobustBench's ``load_model`` reads it: ``<model_dir>/<dataset>/<threat_model>/<name>.pt``, a
torch file holding the state_dict, either bare or under ``"state_dict"`` (some under another key, e.g. ``"last"``),
whose keys may carry a ``module.`` (DataParallel) and/or ``model.`` prefix.

Normalisation: entries that normalise inside the network keep ``mu``/``sigma`` buffers that their files lack (the
zoo loads those non-strictly). Here the normalisation is rpat's :class:`~rpat.models.Normalized` wrapper, so every
file loads strictly and the returned model takes inputs in [0, 1], like rpat's own models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from rpat import zoo
from rpat.checkpoint import CheckpointError
from rpat.errors import UnknownName, UserError
from rpat.files import atomic_write
from rpat.models.registry import Normalized, meta, param_count
from rpat.models.preact_resnet import PreActBlock, PreActResNet
from rpat.models.wide_resnet import NetworkBlock, WideResNet

LEADERBOARD_EPS = {"Linf": 8 / 255, "L2": 0.5}  # the radius the CIFAR leaderboards rank at, per threat model
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)  # the zoo's constant for Rice2020Overfitting and Wong2020Fast
PREFIXES = ("module.", "model.")  # stripped in this order, as the zoo does for CIFAR-10 files


class ZooFileMissing(UserError, FileNotFoundError):
    """A zoo entry's checkpoint is not in the model directory and downloading is off."""


class ZooWideResNet(WideResNet):
    """The zoo's ``WideResNet``: rpat's WideResNet (same keys, same forward at 32x32) plus, where an entry has it,
    ``sub_block1``, a second first group that ``forward`` never calls but whose weights the files hold (the zoo's
    class comes from the TRADES code)."""

    def __init__(self, depth: int, widen_factor: int, sub_block1: bool = False, num_classes: int = 10):
        super().__init__(depth, widen_factor, num_classes)
        if sub_block1:
            self.sub_block1 = NetworkBlock((depth - 4) // 6, 16, 16 * widen_factor, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))
        return self.fc(torch.flatten(F.avg_pool2d(out, 8), 1))  # 8x8 maps at 32x32, as in the zoo


class InputShortcutBlock(PreActBlock):
    """The zoo's ``PreActBlock``: unlike rpat's, the 1x1 projection shortcut reads the raw input x,
    not the pre-activated relu(bn1(x))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + (self.shortcut(x) if self.shortcut is not None else x)


class ZooPreActResNet18(nn.Module):
    """The zoo's ``PreActResNet(PreActBlock, [2, 2, 2, 2])``: input-reading shortcuts and no BN-ReLU before the
    pooling, so 1,024 parameters fewer than rpat's ``preact_resnet18`` (11,171,146 for 10 classes)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        in_planes = 64
        for i, (planes, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2)), start=1):
            blocks = [InputShortcutBlock(in_planes, planes, stride), InputShortcutBlock(planes, planes, 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_planes = planes
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(torch.flatten(F.avg_pool2d(out, 4), 1))  # 4x4 maps at 32x32, as in the zoo


class ZooPreActResNet18V2(PreActResNet):
    """The zoo's ``PreActResNet(PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True)``: rpat's ``preact_resnet18`` (same
    keys, same blocks, 11,172,170 parameters for 10 classes), pooled as the zoo pools."""

    def __init__(self, num_classes: int = 10):
        super().__init__([2, 2, 2, 2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(torch.flatten(F.avg_pool2d(F.relu(self.bn(out)), 4), 1))


@dataclass(frozen=True)
class ZooEntry:
    name: str
    threat_model: str  # the zoo's spelling: "Linf", "L2"
    architecture: str  # the leaderboard's architecture string
    build: Callable[[], nn.Module]  # the network on normalised inputs, as the zoo defines it
    gdrive_id: str
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # (mean, std) inside the zoo's model
    wrapper_key: str | None = None  # the file's dict key holding the weights, where it is not "state_dict"
    dataset: str = "cifar10"
    num_classes: int = 10
    image_size: int = 32


def _wrn(depth: int, widen_factor: int, sub_block1: bool = False) -> Callable[[], nn.Module]:
    return lambda: ZooWideResNet(depth, widen_factor, sub_block1)


_CIFAR = (CIFAR10_MEAN, CIFAR10_STD)
ENTRIES = [
    ZooEntry("Standard", "Linf", "WideResNet-28-10", _wrn(28, 10), "1t98aEuzeTL8P7Kpd5DIrCoCL21BNZUhC"),
    ZooEntry("Carmon2019Unlabeled", "Linf", "WideResNet-28-10", _wrn(28, 10, True),
             "15tUx-gkZMYx7BfEOw1GY5OKC-jECIsPQ"),
    ZooEntry("Sehwag2020Hydra", "Linf", "WideResNet-28-10", _wrn(28, 10, True), "1pi8GHwAVkxVH41hEnf0IAJb_7y-Q8a2Y"),
    ZooEntry("Wang2020Improving", "Linf", "WideResNet-28-10", _wrn(28, 10, True), "1T939mU4kXYt5bbvM55aT4fLBvRhyzjiQ"),
    ZooEntry("Zhang2019Theoretically", "Linf", "WideResNet-34-10", _wrn(34, 10, True),
             "1hPz9QQwyM7QSuWu-ANG_uXR-29xtL8t_"),
    ZooEntry("Huang2020Self", "Linf", "WideResNet-34-10", _wrn(34, 10, True), "1nInDeIyZe2G-mJFxQJ3UoclQNomWjMgm"),
    ZooEntry("Zhang2019You", "Linf", "WideResNet-34-10", _wrn(34, 10, True), "1kB2qqPQ8qUNmK8VKuTOhT1X4GT46kAoA"),
    ZooEntry("Rice2020Overfitting", "Linf", "WideResNet-34-20", _wrn(34, 20), "1vC_Twazji7lBjeMQvAD9uEQxi9Nx2oG-",
             normalization=_CIFAR),
    ZooEntry("Wong2020Fast", "Linf", "PreActResNet-18", ZooPreActResNet18, "1Re--_lf3jCEw9bnQqGkjw3J7v2tSZKrv",
             normalization=_CIFAR),
    ZooEntry("Andriushchenko2020Understanding", "Linf", "PreActResNet-18", ZooPreActResNet18,
             "1Uyvprd98bIyxfMjLdCZwm-NEJ-6GMVis", wrapper_key="last"),
    ZooEntry("Standard", "L2", "WideResNet-28-10", _wrn(28, 10), "1t98aEuzeTL8P7Kpd5DIrCoCL21BNZUhC"),
    ZooEntry("Rice2020Overfitting", "L2", "PreActResNet-18", ZooPreActResNet18V2,
             "1jo-31utiYNBVzLM0NxUEWz0teo3Z0xa7", normalization=_CIFAR),
]
ZOO: dict[tuple[str, str, str], ZooEntry] = {(e.dataset, e.threat_model, e.name): e for e in ENTRIES}


def zoo_entry(name: str, dataset: str = "cifar10", threat_model: str = "Linf") -> ZooEntry:
    """The supported entry ``name`` (``robustbench:`` prefix optional) for ``dataset``/``threat_model``
    (``linf``/``l2`` accepted for the latter)."""
    tm = zoo.zoo_threat_model(threat_model)
    key = (dataset, tm, zoo.entry_name(name))
    if key not in ZOO:
        known = ", ".join(f"{d}/{t}/{n}" for d, t, n in ZOO)
        raise UnknownName(f"RobustBench entry {dataset}/{tm}/{name} is not supported by rpat; supported: {known}")
    return ZOO[key]


def zoo_path(model_dir: str | Path, entry: ZooEntry) -> Path:
    """Where RobustBench keeps the entry's file: ``<model_dir>/<dataset>/<threat_model>/<name>.pt``."""
    return Path(model_dir).expanduser() / entry.dataset / entry.threat_model / f"{entry.name}.pt"


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a leading ``module.`` (DataParallel), then a leading ``model.``, from every key."""
    out = {}
    for key, value in state_dict.items():
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def read_state_dict(path: Path, entry: ZooEntry) -> dict[str, torch.Tensor]:
    """The weights in a zoo file, unwrapped and with prefixes stripped (the file is loaded with weights_only)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"RobustBench checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                              "it is truncated, not a torch file, or holds objects other than tensors; "
                              "delete it and place or download it again") from None
    for key in (entry.wrapper_key, "state_dict", "model_state_dict"):
        if key is not None and isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"RobustBench checkpoint {path} holds no state_dict of tensors "
                              f"(top-level keys: {sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__})")
    return strip_prefixes(obj)


def download_entry(entry: ZooEntry, path: Path) -> None:
    """Fetch the entry's file from the zoo's Google Drive (needs internet and the ``gdown`` package)."""
    try:
        import gdown
    except ImportError:
        raise UserError("downloading RobustBench models needs the gdown package: pip install 'rpat[robustbench]' "
                        f"(or place the file at {path} yourself)") from None
    try:
        atomic_write(path, lambda tmp: gdown.download(id=entry.gdrive_id, output=str(tmp), quiet=False))
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise UserError(f"downloading RobustBench model {entry.name} (Google Drive id {entry.gdrive_id}) failed "
                        f"({type(e).__name__}: {str(e)[:200]}); place the file at {path} instead") from None


def entry_meta(entry: ZooEntry) -> dict:
    """What an rpat checkpoint of the entry records to rebuild it (:func:`rpat.models.build_from_meta`): the
    model name ``robustbench:<entry>``, shape, the normalisation inside the zoo's model, and ``zoo_entry``."""
    mean, std = entry.normalization or ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    return {**meta(zoo.PREFIX + entry.name, num_classes=entry.num_classes, in_channels=3,
                   image_size=entry.image_size, mean=mean, std=std),
            "zoo_entry": {"dataset": entry.dataset, "threat_model": entry.threat_model, "name": entry.name}}


def build_from_meta(m: dict) -> Normalized:
    """The entry's architecture (untrained) on inputs in [0, 1], from :func:`entry_meta`'s record."""
    entry = zoo_entry(**m["zoo_entry"])
    return Normalized(entry.build(), m["mean"], m["std"])


def catalog_entries() -> dict[str, list[str]]:
    """``robustbench:<entry>`` -> its ``<dataset>/<threat model>`` pairs, for the config's catalog."""
    out: dict[str, list[str]] = {}
    for e in ENTRIES:
        out.setdefault(zoo.PREFIX + e.name, []).append(f"{e.dataset}/{e.threat_model}")
    return out


def load_robustbench(name: str, *, model_dir: str | Path, dataset: str = "cifar10", threat_model: str = "Linf",
                     download: bool = False) -> tuple[nn.Module, dict]:
    """Load zoo entry ``name`` from ``model_dir``: (model on inputs in [0, 1], in eval mode, on the CPU; info).

    ``info`` holds name, dataset, threat_model, architecture, num_classes, in_channels, image_size, mean, std
    (the normalisation inside the model), params and path. With ``download`` off, a missing file raises
    :class:`ZooFileMissing` naming the expected path, before anything is built.
    """
    entry = zoo_entry(name, dataset, threat_model)
    path = zoo_path(model_dir, entry)
    if not path.is_file():
        if not download:
            raise ZooFileMissing(
                f"RobustBench model {entry.dataset}/{entry.threat_model}/{entry.name} is not in the model directory: "
                f"{path} does not exist; place the zoo's {entry.name}.pt there, or turn downloading on "
                "(methods.pretrained.download: true) on a machine with internet")
        download_entry(entry, path)
    state_dict = read_state_dict(path, entry)
    m = entry_meta(entry)
    model = build_from_meta(m)
    try:
        model.net.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"RobustBench checkpoint {path} does not fit the {entry.architecture} of "
                              f"{entry.name}: {str(e)[:400]}") from None
    info = {"name": entry.name, "dataset": entry.dataset, "threat_model": entry.threat_model,
            "architecture": entry.architecture, "num_classes": entry.num_classes, "in_channels": 3,
            "image_size": entry.image_size, "mean": m["mean"], "std": m["std"], "params": param_count(model),
            "path": str(path)}
    return model.eval(), info
