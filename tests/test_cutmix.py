"""CutMix (rpat/data/augment.py, rpat/data/batches.py; docs/faithfulness.md "Data and augmentation") on
hand-made tensors: box geometry, area <-> label weights, the mixed cross-entropy, determinism, resumable
batches, config checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rpat import config
from rpat.attacks import ce_loss
from rpat.data import Batches, CutMix
from rpat.data.augment import _beta_draw, cutmix_box
from rpat.errors import ConfigError


def test_box_geometry_by_hand():
    # per axis half = int(size sqrt(1 - lam)) // 2, box [c - half, c + half) clipped to the image
    assert cutmix_box(8, 8, 0.75, 4, 4) == (2, 6, 2, 6)  # sqrt(0.25) 8 = 4: a 4x4 box, area (1 - lam) 64
    assert cutmix_box(8, 8, 0.75, 0, 7) == (0, 2, 5, 8)  # clipped at a corner: 2x3
    assert cutmix_box(8, 8, 1.0, 3, 3) == (3, 3, 3, 3)  # lam = 1: nothing pasted
    assert cutmix_box(8, 8, 0.0, 4, 4) == (0, 8, 0, 8)  # lam = 0: the whole image
    assert cutmix_box(7, 10, 0.5, 3, 5) == (1, 5, 2, 8)  # int(4.95) // 2 = 2, int(7.07) // 2 = 3
    assert cutmix_box(8, 8, 0.5, 4, 4) == (2, 6, 2, 6)  # int(5.66) = 5 is odd: the side is 4, as published


def _constant_images(n=6, c=2, h=8, w=8):
    """Image i is filled with (i + 1) / 100, so each pasted pixel tells where it came from."""
    x = ((torch.arange(n, dtype=torch.float64) + 1) / 100).view(n, 1, 1, 1).expand(n, c, h, w).clone()
    return x, torch.tensor([0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize("seed", range(6))
def test_box_area_sets_the_label_weights(seed):
    x, y = _constant_images()
    n, c, h, w = x.shape
    out, t = CutMix(num_classes=3)(x, y, torch.Generator().manual_seed(seed))
    assert out.shape == x.shape and t.shape == (n, 3) and t.dtype == x.dtype
    pasted = (out != x).any(dim=1)  # n, h, w
    source = (out[:, 0] * 100).round().long() - 1  # which image each pixel now comes from
    for i in range(n):
        partner = int(source[i][pasted[i]].unique().item()) if pasted[i].any() else i
        if partner == i:  # paired with itself or an empty box: the image and its label are unchanged
            assert torch.equal(out[i], x[i]) and t[i].tolist() == F.one_hot(y[i], 3).double().tolist()
            continue
        rows, cols = pasted[i].any(1).nonzero().flatten(), pasted[i].any(0).nonzero().flatten()
        box = (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1)
        assert int(pasted[i].sum()) == (box[1] - box[0]) * (box[3] - box[2])  # a rectangle
        own = 1 - (box[1] - box[0]) * (box[3] - box[2]) / (h * w)
        expected = [0.0, 0.0, 0.0]
        expected[int(y[i])] += own
        expected[int(y[partner])] += 1 - own
        assert t[i].tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert t.sum(1).tolist() == pytest.approx([1.0] * n, rel=1e-12)
    assert torch.equal(x, _constant_images()[0])  # the input batch is not modified


def test_the_same_box_for_the_whole_batch_and_a_permutation_of_partners():
    x, y = _constant_images(n=6)
    for seed in range(20):
        out, _ = CutMix(num_classes=3)(x, y, torch.Generator().manual_seed(seed))
        pasted = (out != x).any(dim=1)
        masks = {tuple(m.flatten().tolist()) for m in pasted if m.any()}
        assert len(masks) <= 1
        if masks:  # the partners' patches: every image is somebody's partner once (or its own)
            box = torch.tensor(next(iter(masks))).view(8, 8)
            src = [int((out[i, 0][box] * 100).round()[0]) - 1 for i in range(6)]
            assert sorted(src) == list(range(6))


def test_cross_entropy_with_mixed_targets_is_the_lambda_mix():
    # CE(z, lam e_a + (1 - lam) e_b) = -sum_c t_c log p_c = lam CE(z, a) + (1 - lam) CE(z, b), per example
    # and so for the batch mean: the published mixup_criterion with probability targets.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 5, generator=g, dtype=torch.float64)
    a = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    b = torch.tensor([4, 1, 0, 0, 2, 3, 3])
    for lam in (0.0, 0.3, 0.828125, 1.0):
        t = lam * F.one_hot(a, 5).double() + (1 - lam) * F.one_hot(b, 5).double()
        mixed = lam * F.cross_entropy(z, a) + (1 - lam) * F.cross_entropy(z, b)
        assert float(F.cross_entropy(z, t)) == pytest.approx(float(mixed), rel=1e-13)
        assert float(ce_loss(z, t)) == pytest.approx(float(mixed), rel=1e-13)  # the attacks' inner CE
    # one row by hand: z = [0, ln 2, ln 3] -> p = [1/6, 2/6, 3/6]; t = 0.25 e_0 + 0.75 e_2
    z1 = torch.tensor([[0.0, math.log(2), math.log(3)]], dtype=torch.float64)
    t1 = torch.tensor([[0.25, 0.0, 0.75]], dtype=torch.float64)
    assert float(F.cross_entropy(z1, t1)) == pytest.approx(0.25 * math.log(6) + 0.75 * math.log(2), rel=1e-14)


def test_draws_are_a_function_of_the_generator_only():
    x, y = _constant_images()
    mix = CutMix(num_classes=3)
    state = torch.random.get_rng_state()
    a = mix(x, y, torch.Generator().manual_seed(3))
    b = mix(x, y, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    outs = {tuple(mix(x, y, torch.Generator().manual_seed(s))[1].flatten().tolist()) for s in range(8)}
    assert len(outs) > 4


def test_beta_draws():
    # Beta(1, 1) is uniform on [0, 1]; Beta(2, 5) has mean 2/7 and variance 10/392
    g = torch.Generator().manual_seed(0)
    u = [_beta_draw(1.0, 1.0, g) for _ in range(2000)]
    assert 0.0 <= min(u) and max(u) <= 1.0
    assert sum(u) / len(u) == pytest.approx(0.5, abs=0.02)
    assert sum(v < 0.25 for v in u) / len(u) == pytest.approx(0.25, abs=0.025)
    v = [_beta_draw(2.0, 5.0, g) for _ in range(2000)]
    m = sum(v) / len(v)
    assert m == pytest.approx(2 / 7, abs=0.01)
    assert sum((s - m) ** 2 for s in v) / len(v) == pytest.approx(10 / 392, rel=0.1)
    same = [_beta_draw(2.0, 5.0, torch.Generator().manual_seed(1)) for _ in range(2)]
    assert same[0] == same[1]


def _loader(seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (40, 1, 6, 6), generator=torch.Generator().manual_seed(9), dtype=torch.uint8)
    y = torch.arange(40) % 4
    return Batches(x, y, 8, shuffle=True, mix=CutMix(num_classes=4), generator=g, **kw)


def test_batches_yield_probability_targets_and_resume_mid_epoch():
    full = _loader()
    order = full.new_order()
    everything = list(full.iterate(order))
    assert len(everything) == 5
    for xb, tb in everything:
        assert xb.dtype == torch.float32 and tb.shape == (8, 4) and tb.dtype == torch.float32
        assert tb.sum(1).tolist() == pytest.approx([1.0] * 8, rel=1e-6)
    # stop after 2 batches, keep the generator's state (what a preempted job saves), continue in a fresh loader
    part = _loader()
    order2 = part.new_order()
    head = [b for _, b in zip(range(2), part.iterate(order2))]
    saved = part.generator.get_state()
    again = _loader(seed=123)
    again.generator.set_state(saved)
    rest = list(again.iterate(order2, start=2))
    for (xa, ta), (xb, tb) in zip(head + rest, everything):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)


def test_cutmix_takes_one_view():
    with pytest.raises(ValueError, match="one view"):
        _loader(views=2)


RAW = {
    "experiment": "unit", "tracking": {"enabled": False},
    "grid": [{"dataset": ["digits"], "model": ["cnn"], "norm": ["linf"], "method": ["rebat"], "rpat": [False, True],
              "seed": [0]}],
    "data": {"val_size": 64, "train_subset": 128, "augment": "none", "batch_size": 64,
             "cutmix": {"enabled": True, "alpha": 1.0, "beta": 1.0}},
    "threat": {"linf": {"eps": 0.2, "step": 0.1, "steps": 2}},
    "train": {"epochs": 2, "lr": 0.05, "schedule": {"name": "constant"}, "val_attack_steps": 1},
    "methods": {"rebat": {"warmup_epoch": 2, "decay": 0.5}},
    "eval": {"n_examples": 16, "autoattack": {"enabled": False}},
}


@pytest.mark.parametrize("method", ["mart", "consistency", "pgd_at", "trades"])
def test_cutmix_is_refused_for_methods_that_need_integer_labels(method):
    raw = {**RAW, "grid": [{**RAW["grid"][0], "method": [method], "rpat": [False]}]}
    with pytest.raises(ConfigError, match=f"data.cutmix.enabled is on, but method '{method}'.*works with: rebat"):
        config.from_dict(raw)


def test_cutmix_keys_are_validated():
    with pytest.raises(ConfigError, match="data.cutmix.alpha"):
        config.from_dict({**RAW, "data": {**RAW["data"], "cutmix": {"enabled": True, "alpha": 0}}})
    with pytest.raises(ConfigError, match="unknown key 'prob'"):
        config.from_dict({**RAW, "data": {**RAW["data"], "cutmix": {"prob": 0.5}}})
    assert config.from_dict(RAW).settings(config.Cell("digits", "cnn", "linf", "rebat", True, 0)).data.cutmix.enabled


def test_rpat_plus_plus_trains_with_cutmix(tmp_path):
    from rpat import train

    rec = train.train_cell(config.from_dict(RAW), config.Cell("digits", "cnn", "linf", "rebat", True, 0), tmp_path)
    assert [h["epoch"] for h in rec["history"]] == [1, 2]
    assert all(math.isfinite(h["loss_total"]) for h in rec["history"])
    assert rec["history"][1]["loss_rpat"] > 0  # the regulariser is on in epoch 2
    assert rec["settings"]["data"]["cutmix"] == {"enabled": True, "alpha": 1.0, "beta": 1.0}
