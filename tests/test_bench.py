"""The benchmark's output contract, on tiny settings (the numbers themselves are in BENCHMARKS.md)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from rpat.settings import Threat

_spec = importlib.util.spec_from_file_location("bench", Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_train_step_lines_and_overhead_ratios():
    lines = []
    bench.bench_train_steps(lines.append, model_name="cnn", batch=4, size=8, channels=3, steps=1, repeats=1,
                            device=torch.device("cpu"), objectives_list=["pgd_at", "trades"])
    steps = [l for l in lines if l["name"] == "train_step"]
    assert {(l["objective"], l["rpat"]) for l in steps} == {("pgd_at", False), ("pgd_at", True), ("trades", False),
                                                            ("trades", True)}
    for l in steps:
        assert l["unit"] == "s/step" and l["value"] > 0 and l["model"] == "cnn" and l["batch"] == 4
    ratios = {l["name"]: l for l in lines if l["name"].startswith("rpat_overhead_")}
    assert set(ratios) == {"rpat_overhead_pgd_at", "rpat_overhead_trades"}
    on = next(l["value"] for l in steps if l["objective"] == "trades" and l["rpat"])
    off = next(l["value"] for l in steps if l["objective"] == "trades" and not l["rpat"])
    assert ratios["rpat_overhead_trades"]["value"] == on / off


def test_reference_step_recreation_trains():
    """The re-created published step moves the weights and leaves x untouched."""
    torch.manual_seed(0)
    model = bench._model("cnn", 3, 8, torch.device("cpu"))
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    before = [p.detach().clone() for p in model.parameters()]
    x0 = x.clone()
    bench.make_reference_step(model, x, y, Threat("linf", 8 / 255, 2 / 255, 2), rpat=True)()
    assert torch.equal(x, x0)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_median_time_excludes_warmup():
    calls = []
    assert bench.median_time(lambda: calls.append(1), repeats=3, warmup=2, device=torch.device("cpu")) >= 0
    assert len(calls) == 5


def test_a_benchmark_that_cannot_measure_says_so(tmp_path, monkeypatch):
    """Without the project's Snakefile (a non-editable install) the planning benchmark fails loudly."""
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    lines = []
    with pytest.raises(bench.CannotMeasure, match="plan_paper_grid"):
        bench.bench_jobs(lines.append, demo=False, quick=True)
    assert lines == []
