"""Files for RobustBench-cell tests: a CIFAR-shaped image folder and a zoo checkpoint written in the zoo's layout."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rpat.models.robustbench import ZooPreActResNet18, zoo_entry, zoo_path



def write_imagefolder(root: Path, classes: int = 10, train_per_class: int = 4, test_per_class: int = 2,
                      seed: int = 0) -> Path:
    """``root/train/<class>/*.png`` and ``root/test/<class>/*.png``: 32x32 RGB, each class a colour of its own
    plus noise (separable, so a one-epoch model beats chance)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(classes, 3))
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for k, name in enumerate(f"c{k}" for k in range(classes)):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = np.clip(colours[k] + rng.normal(0, 20, size=(32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    return root


def write_zoo_checkpoint(model_dir: Path, name: str = "Wong2020Fast", seed: int = 0) -> tuple[Path, dict]:
    """A PreActResNet-18 entry's file as the zoo ships it: seeded random weights under ``state_dict`` with
    DataParallel ``module.`` keys. Returns its path and the state_dict (without prefixes)."""
    entry = zoo_entry(name)
    torch.manual_seed(seed)
    net = ZooPreActResNet18()
    with torch.no_grad():  # BN statistics away from their init, so a loader that skips buffers would show
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = net.state_dict()
    path = zoo_path(model_dir, entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 15}, path)
    return path, state
