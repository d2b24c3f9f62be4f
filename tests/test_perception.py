"""Perception measurements: logit MSE split by outcome, path nonlinearity of models with known curvature."""

import math

import pytest
import torch
from torch import nn

from handcalc import PowNet, lab, t
from rpat import perception
from rpat.errors import UserError


class Affine(nn.Module):
    """z(x) = W x + b in float64, then dropout: in train mode the path would not be linear, so eval mode is checked."""

    def __init__(self, d=6, c=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(c, d, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(c, generator=g, dtype=torch.float64))
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(x.flatten(1) @ self.W.T + self.b)


class Quadratic(nn.Module):
    """z(x) = W x + (q.x)^2 e (float64).

    With u = q.x, v = q.(x_adv - x): z(x_a) - [(1-a) z(x) + a z(x_adv)]
      = [(u + a v)^2 - (1-a) u^2 - a (u + v)^2] e = -a(1-a) v^2 e,
    so the per-a MSE is (a(1-a))^2 v^4 mean(e^2).
    """

    W = [[1.0, 2.0], [3.0, -1.0], [0.0, 1.0]]
    q = [1.0, -1.0]
    e = [1.0, 2.0, -2.0]  # mean(e^2) = 9/3 = 3

    def forward(self, x):
        return x @ t(self.W).T + (x @ t(self.q)).pow(2)[:, None] * t(self.e)


# Example 0: x = (0.5, 0.25), x_adv = (1.5, -0.75): Delta = (1, -1), v = 2, v^4 mean(e^2) = 48.
# Example 1: x = (0, 0), x_adv = (1, 0): v = 1, v^4 mean(e^2) = 3.
X = t([[0.5, 0.25], [0.0, 0.0]])
X_ADV = t([[1.5, -0.75], [1.0, 0.0]])


def test_logit_mse_is_mean_over_classes():
    mse = perception.logit_mse(t([[1, 2, 3], [0, 0, 0]]), t([[1, 0, 0], [2, 2, 2]]))
    assert mse.tolist() == [(0 + 4 + 9) / 3, 4.0]
    with pytest.raises(UserError, match="same examples"):
        perception.logit_mse(t([[1, 2]]), t([[1, 2, 3]]))


def test_split_by_outcome_means_over_examples_and_empty_group_is_nan():
    s = perception.split_by_outcome(t([1, 2, 3, 4]), torch.tensor([True, False, True, True]))
    assert s == {"all": 2.5, "success": pytest.approx(8 / 3, abs=1e-15), "failure": 2.0,
                 "n": 4, "n_success": 3, "n_failure": 1}
    s = perception.split_by_outcome(t([1, 2]), torch.tensor([True, True]))
    assert s["success"] == 1.5 and s["n_failure"] == 0 and math.isnan(s["failure"])
    with pytest.raises(UserError, match="one outcome per example"):
        perception.split_by_outcome(t([1, 2]), torch.tensor([True]))


def test_motivation_accuracies_and_split_by_hand():
    model = PowNet([[1, 0], [0, 1]])  # z(x) = x: the prediction is the larger coordinate
    model.train()
    x = t([[1, 0], [0, 1], [1, 0], [0, 1]])
    y = lab([0, 1, 1, 1])  # clean correct: T T F T
    x_pert = t([[0, 2], [0, 1], [1, 2], [2, 1]])  # predicted 1 1 1 0 -> defended F T T F
    # per-example MSE: ((-1)^2 + 2^2)/2 = 2.5, 0, (0 + 2^2)/2 = 2, (2^2 + 0)/2 = 2
    for bs in (1, 3, 500):
        m = perception.motivation(model, x, y, x_pert, batch_size=bs)
        assert m["clean_acc"] == 75.0 and m["perturbed_acc"] == 50.0
        assert m["mse"] == {"all": 1.625, "success": 1.0, "failure": 2.25, "n": 4, "n_success": 2, "n_failure": 2}
        assert m["per_example"]["mse"].tolist() == [2.5, 0.0, 2.0, 2.0]
        assert m["per_example"]["defended"].tolist() == [False, True, True, False]
        assert m["per_example"]["clean_correct"].tolist() == [True, True, False, True]
    assert model.training  # restored

    shards = [perception.motivation(model, x[i:i + 2], y[i:i + 2], x_pert[i:i + 2])["per_example"] for i in (0, 2)]
    merged = perception.merge_shards(shards)
    assert perception.summarize_motivation(merged) == {k: v for k, v in m.items() if k != "per_example"}
    with pytest.raises(UserError, match="labels"):
        perception.motivation(model, x, y[:3], x_pert)


def test_affine_model_has_zero_path_nonlinearity_at_every_alpha():
    model = Affine()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(7, 6, generator=g, dtype=torch.float64)
    x_adv = x + 0.3 * torch.randn(7, 6, generator=g, dtype=torch.float64)
    model.train()  # dropout would make the path nonlinear: eval mode must be used
    pe = perception.path_analysis(model, x, x_adv, batch_size=3)
    assert pe["path_mse"].shape == (11, 7)
    assert float(pe["path_mse"].abs().max()) < 1e-28  # float64 rounding of O(1) logits, squared
    s = perception.summarize_path(pe)
    assert s["alphas"] == pytest.approx([k / 10 for k in range(11)], abs=1e-15) and len(s["per_alpha"]) == 11
    assert s["nonlinearity"] < 1e-28
    # affine: z(mid) - z(x) = z(x_adv) - z(mid) = W Delta / 2
    assert torch.allclose(pe["mid_clean"], pe["mid_adv"], rtol=1e-12, atol=0)
    half = (x_adv - x) @ model.W.detach().T / 2
    assert torch.allclose(pe["mid_clean"], half.pow(2).mean(1), rtol=1e-12, atol=0)
    assert model.training


def test_quadratic_model_path_matches_hand_values():
    alphas = [0.0, 0.1, 0.25, 0.5, 1.0]
    prof = perception.path_profile(Quadratic(), X, X_ADV, alphas)
    # (a(1-a))^2 * 48 and * 3: a=0.1 -> 0.0081; a=0.25 -> 0.03515625; a=0.5 -> 0.0625
    expected = [[0.0, 0.3888, 1.6875, 3.0, 0.0], [0.0, 0.0243, 0.10546875, 0.1875, 0.0]]
    assert torch.allclose(prof.T, t(expected), rtol=1e-12, atol=1e-15)

    s = perception.summarize_path(perception.path_analysis(Quadratic(), X, X_ADV))
    # default 11 alphas k/10: sum_k (k(10-k)/100)^2 = 3333/10^4, so the mean over a is 0.3333/11 * v^4 mean(e^2)
    assert s["per_alpha"][5] == pytest.approx((3.0 + 0.1875) / 2, rel=1e-12)
    assert s["nonlinearity"] == pytest.approx(0.3333 / 11 * (48 + 3) / 2, rel=1e-12)


def test_quadratic_model_midpoint_by_hand():
    mid_clean, mid_adv = perception.midpoint_mses(Quadratic(), X[:1], X_ADV[:1])
    # u = q.x = 0.25, v = 2, W Delta / 2 = (-0.5, 2, -0.5)
    # z(m) - z(x) = (-0.5, 2, -0.5) + ((u + v/2)^2 - u^2) e = (-0.5, 2, -0.5) + 1.5 e = (1, 5, -3.5) -> 38.25/3
    # z(x_adv) - z(m) = (-0.5, 2, -0.5) + ((u + v)^2 - (u + v/2)^2) e = ... + 3.5 e = (3, 9, -7.5) -> 146.25/3
    assert mid_clean.tolist() == pytest.approx([12.75], rel=1e-14)
    assert mid_adv.tolist() == pytest.approx([48.75], rel=1e-14)


def test_path_split_by_outcome_and_shards():
    pe = perception.path_analysis(Quadratic(), X, X_ADV, batch_size=1)
    halves = [perception.path_analysis(Quadratic(), X[i:i + 1], X_ADV[i:i + 1]) for i in (0, 1)]
    merged = perception.merge_shards(halves)
    assert all(torch.equal(merged[k], pe[k]) for k in pe)
    s = perception.summarize_path(pe, defended=torch.tensor([False, True]))
    per_ex = 0.3333 / 11 * torch.tensor([48.0, 3.0], dtype=torch.float64)
    assert s["by_outcome"]["nonlinearity"]["failure"] == pytest.approx(float(per_ex[0]), rel=1e-12)
    assert s["by_outcome"]["nonlinearity"]["success"] == pytest.approx(float(per_ex[1]), rel=1e-12)
    assert s["by_outcome"]["mid_clean"]["failure"] == pytest.approx(12.75, rel=1e-14)


def test_bad_inputs_are_named():
    with pytest.raises(UserError, match="at least 2"):
        perception.default_alphas(1)
    with pytest.raises(UserError, match=r"in \[0, 1\]"):
        perception.path_profile(Quadratic(), X, X_ADV, [0.5, 1.5])
    with pytest.raises(UserError, match="one perturbed input per clean input"):
        perception.path_profile(Quadratic(), X, X_ADV[:1])
    with pytest.raises(UserError, match="alphas the path was measured at"):
        perception.summarize_path(perception.path_analysis(Quadratic(), X, X_ADV, [0.0, 1.0]))
    with pytest.raises(UserError, match="lack"):
        perception.summarize_motivation({"mse": t([1.0])})
    with pytest.raises(UserError, match="same kind"):
        perception.merge_shards([{"mse": t([1.0])}, {"path_mse": t([[1.0]])}])
