"""Extra training data mixed into every batch (rpat/data/extra.py) and SVHN from torchvision's .mat files
(rpat/data/svhn.py); the files are written by the tests."""

import json

import numpy as np
import pytest
import torch

from interrupt import signal_at_step
from tiny import tiny_config, tiny_grid

from rpat import checkpoint, config, data, train
from rpat.data.extra import MixedBatches, load_extra, training_batches
from rpat.data.svhn import read_svhn_mat
from rpat.errors import DataProblem
from rpat.settings import DataSettings


def write_extra(path, n=40, size=8, channels=1, classes=10, **arrays):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    label = (np.arange(n) % classes).astype(np.int64)
    np.savez(path, **{"image": image, "label": label, **arrays})
    return image, label


def test_load_extra_checks_the_file_against_the_data_set(tmp_path):
    image, label = write_extra(tmp_path / "ok.npz")
    x, y = load_extra(tmp_path / "ok.npz", 8, 1, 10)
    assert x.dtype == torch.uint8 and list(x.shape) == [40, 8, 8, 1] and torch.equal(x, torch.from_numpy(image))
    assert y.dtype == torch.int64 and y.tolist() == label.tolist()
    np.savez(tmp_path / "grey.npz", image=image[..., 0], label=label)  # [N, H, W] for one channel
    assert list(load_extra(tmp_path / "grey.npz", 8, 1, 10)[0].shape) == [40, 8, 8, 1]
    cases = {
        "missing.npz": (None, "does not exist"),
        "nolabel.npz": ({"image": image}, "no 'label' array"),
        "float.npz": ({"image": image.astype(np.float32), "label": label}, r"'image' is float32 \[40, 8, 8, 1\]"),
        "size.npz": ({"image": image[:, :4], "label": label}, r"needs uint8 \[N, 8, 8, 1\]"),
        "labels.npz": ({"image": image, "label": label + 5}, r"labels must lie in 0\.\.9"),
        "count.npz": ({"image": image, "label": label[:3]}, r"expected integers \[40\]"),
    }
    for name, (arrays, message) in cases.items():
        if arrays is not None:
            np.savez(tmp_path / name, **arrays)
        with pytest.raises(DataProblem, match=message):
            load_extra(tmp_path / name, 8, 1, 10)
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataProblem, match="cannot be read as an .npz"):
        load_extra(tmp_path / "junk.npz", 8, 1, 10)


def mixed(n=10, n_extra_images=6, batch_size=4, fraction=0.5, seed=0):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1) / 255  # image i holds the value i
    ex = (100 + torch.arange(n_extra_images)).to(torch.uint8).view(-1, 1, 1, 1)  # extra image j holds 100 + j
    return MixedBatches(x, torch.arange(n), ex, 10 + torch.arange(n_extra_images), batch_size, fraction,
                        generator=torch.Generator().manual_seed(seed))


def test_mixed_batches_draw_the_fraction_from_the_extra_data():
    b = mixed()  # 10 images, batch 4 with floor(0.5 * 4) = 2 extra: ceil(10/4) = 3 batches, 6 own images
    assert (len(b), b.examples, b.n_own, b.n_extra) == (3, 12, 2, 2)
    order = b.new_order()
    batches = list(b.iterate(order))
    own = [int(v) for xb, yb in batches for v in (xb[:2].flatten() * 255).round()]
    assert len(set(own)) == 6 and set(own) <= set(range(10))  # one seeded permutation, no repeats in an epoch
    for xb, yb in batches:
        assert xb.shape == (4, 1, 1, 1) and yb[:2].tolist() == (xb[:2].flatten() * 255).round().long().tolist()
        extra = (xb[2:].flatten() * 255).round().long()
        assert ((extra >= 100) & (extra < 106)).all() and yb[2:].tolist() == (extra - 90).tolist()  # label 10 + j
    assert [t.tolist() for t in torch.cat([yb for _, yb in batches]).split(4)] == \
        [t.tolist() for t in torch.cat([yb for _, yb in mixed().iterate(mixed().new_order())]).split(4)]  # seeded
    resumed = list(b.iterate(order, start=2))  # resuming inside the epoch gives the same last batch
    assert torch.equal(resumed[0][0], batches[2][0]) and torch.equal(resumed[0][1], batches[2][1])


def test_an_epoch_needing_more_own_images_than_exist_starts_a_second_permutation():
    b = mixed(n=5, batch_size=4, fraction=0.3)  # floor(1.2) = 1 extra, 3 own per batch, 2 batches: 6 > 5
    own = b.new_order().view(2, 4)[:, :3].flatten().tolist()
    assert sorted(own[:5]) == [0, 1, 2, 3, 4] and 0 <= own[5] < 5


def test_without_extra_data_the_loader_is_the_plain_one():
    splits = data.load_splits("digits", DataSettings(val_size=100).options())
    plain = training_batches(splits, DataSettings(augment="none", batch_size=64), views=1, device="cpu",
                             generator=torch.Generator().manual_seed(3))
    assert type(plain) is data.Batches and plain.examples == len(splits.train[1])
    reference = data.Batches(*splits.train, 64, shuffle=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(next(iter(plain))[0], next(iter(reference))[0])


def extra_config(tmp_path):
    write_extra(tmp_path / "extra.npz", n=50)
    return config.from_dict(tiny_config(
        tracking={"enabled": False}, grid=tiny_grid(method=["trades"], rpat=[True]),
        data={"val_size": 32, "train_subset": 256, "augment": "crop_flip", "extra": str(tmp_path / "extra.npz"),
              "extra_fraction": 0.25},
        train={"val_attack_steps": 1}))


def test_training_with_extra_data_resumes_mid_epoch_exactly(tmp_path, monkeypatch):
    cfg = extra_config(tmp_path)
    cell = cfg.cells()[0]
    assert cfg.settings(cell).training_part()["data"]["extra_fraction"] == 0.25  # part of the fingerprint
    straight = train.train_cell(cfg, cell, tmp_path / "straight", threads=1)
    assert len(straight["history"]) == 2 and np.isfinite(straight["history"][0]["loss_total"])

    restore = signal_at_step(monkeypatch, 6)  # epoch 2, step 2 of 4
    with pytest.raises(train.Preempted, match=r"epoch 2, step 2/4"):
        train.train_cell(cfg, cell, tmp_path / "resumed", threads=1)
    restore()
    train.train_cell(cfg, cell, tmp_path / "resumed", threads=1)
    a, b = (checkpoint.load(tmp_path / d / "checkpoint-last.pt")["model"] for d in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = (json.loads((tmp_path / d / "train.json").read_text())["history"] for d in ("straight", "resumed"))
    assert [h["loss_total"] for h in ha] == [h["loss_total"] for h in hb]


# ---------------------------------------------------------------------------------------------
# SVHN


def write_svhn(root, n_train=60, n_test=20):
    """torchvision's layout: X uint8 [32, 32, 3, N], y [N, 1] with 10 for the digit 0."""
    from scipy.io import savemat

    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)  # 1..10
        savemat(root / name, {"X": X, "y": y})
    return root


def test_svhn_reads_torchvisions_layout(tmp_path):
    from scipy.io import loadmat

    root = write_svhn(tmp_path / "svhn")
    x, y = read_svhn_mat(root / "train_32x32.mat")
    raw = loadmat(root / "train_32x32.mat")
    assert x.dtype == torch.uint8 and list(x.shape) == [60, 3, 32, 32]
    assert int(x[7, 2, 5, 9]) == int(raw["X"][5, 9, 2, 7])  # image 7, channel 2, row 5, column 9
    assert y.tolist()[:11] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]  # label 10 is the digit 0
    splits = data.load_splits("svhn", {"paths": {"svhn": str(root)}, "val_size": 10})
    assert (len(splits.train[1]), len(splits.val[1]), len(splits.test[1])) == (50, 10, 20)
    assert (splits.num_classes, splits.channels, splits.image_size) == (10, 3, 32)
    assert data.DATASETS["svhn"].display == "SVHN" and data.DATASETS["svhn"].on_disk


def test_svhn_missing_or_broken_files_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(DataProblem, match=r"train_32x32\.mat.*not found.*data\.download: true"):
        data.load_splits("svhn", {"paths": {"svhn": str(tmp_path / "none")}})
    root = write_svhn(tmp_path / "svhn")
    (root / "test_32x32.mat").write_bytes(b"garbage")
    with pytest.raises(DataProblem, match=r"test_32x32\.mat cannot be read"):
        data.load_splits("svhn", {"paths": {"svhn": str(root)}})


def test_svhn_trains_with_the_eps_ramp(tmp_path):
    root = write_svhn(tmp_path / "svhn", n_train=80)
    cfg = config.from_dict(tiny_config(
        tracking={"enabled": False}, grid=tiny_grid(dataset=["svhn"], rpat=[True]),
        data={"paths": {"svhn": str(root)}, "val_size": 16, "train_subset": None, "batch_size": 32},
        threat={"linf": {"eps": "8/255", "step": "1/255", "steps": 2}},
        train={"lr": 0.01, "val_attack_steps": 1, "eps_warmup_epochs": 2}))
    record = train.train_cell(cfg, cfg.cells()[0], tmp_path / "run", threads=1)
    assert [h["epoch"] for h in record["history"]] == [1, 2] and record["settings"]["train"]["eps_warmup_epochs"] == 2
    assert checkpoint.load(tmp_path / "run" / "checkpoint-last.pt")["mean"] == pytest.approx([0.4377, 0.4438, 0.4728])
