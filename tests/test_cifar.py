"""Real CIFAR-10 (the offline JPEG archive) through the real CIFAR-sized path; skips without the archive."""

import pytest
import torch
from tiny import tiny_config

from rpat import config, data, train
from rpat.jobs import evaluate


@pytest.mark.slow
def test_preact_resnet18_pgd_at_rpat_one_epoch_on_512_cifar10_images(cifar10_jpeg_root, tmp_path):
    cfg = config.from_dict(tiny_config(
        experiment="cifar-smoke",
        tracking={"enabled": False},
        grid=[{"dataset": ["cifar10"], "model": ["preact_resnet18"], "norm": ["linf"], "method": ["pgd_at"],
               "rpat": [True], "seed": [0]}],
        data={"paths": {"cifar10": str(cifar10_jpeg_root)}, "train_subset": 512, "batch_size": 128,
              "augment": "crop_flip"},
        threat={"linf": {"eps": "8/255", "step": "2/255", "steps": 3}},
        train={"epochs": 1, "val_attack_steps": 3},
        # AutoAttack's Square (5,000 queries per surviving point) takes minutes for an 11M-parameter
        # network on CPU; the AutoAttack path is covered on digits (test_workflow, the demo).
        eval={"n_examples": 32, "pgd_steps": 20, "cw_steps": 5},
    ))
    cell = cfg.cells()[0]
    resolved = cfg.resolve(cell)
    # The image folders are class-sorted; both subsets must still hold all 10 classes, in proportion.
    splits = data.load_splits("cifar10", resolved["data"])
    left = torch.bincount(data.load_splits("cifar10", {**resolved["data"], "train_subset": None}).train[1])
    got = torch.bincount(splits.train[1], minlength=10)
    assert int(got.sum()) == 512 and (got - 512 * left / left.sum()).abs().max() < 1 and got.min() >= 50
    ecfg = resolved["eval"]
    test_idx = data.eval_subset(splits.test[1], ecfg["n_examples"], ecfg["subset"], ecfg["subset_seed"])
    assert torch.bincount(splits.test[1][test_idx], minlength=10).tolist() == [4, 4, 3, 3, 3, 3, 3, 3, 3, 3]
    rec = train.train_cell(cfg, cell, tmp_path)
    h = rec["history"][0]
    assert h["loss_rpat"] > 0 and h["loss_total"] == pytest.approx(h["loss_ce"] + h["loss_rpat_weighted"], rel=1e-5)
    res = evaluate.evaluate_cell(cfg, cell, tmp_path)
    assert res["n_examples"] == 32 and res["eps"] == pytest.approx(8 / 255)
    assert 0 <= res["pgd20"] <= res["clean"] <= 100 and 0 <= res["cw"] <= 100
