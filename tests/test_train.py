"""Training and evaluation jobs on tiny real data: outputs, exact resume, fault handling, the CLI."""

import json
import subprocess
import sys

import pytest
import torch
from interrupt import signal_at_step
from tiny import tiny_config, tiny_grid

from rpat import accuracy, checkpoint, config, train
from rpat.jobs import evaluate
from rpat.evaluation import measurements

# Two methods with and without RPAT; the learning rate drops tenfold after epoch 1; ReBAT's decay starts at
# epoch 2 (the last).
UNIT = tiny_config(experiment="unit", tracking={"enabled": False},
                   grid=tiny_grid(method=["trades", "rebat"]),
                   train={"schedule": {"name": "multistep", "milestones": [1]}},
                   methods={"rebat": {"warmup_epoch": 2, "decay": 0.5}})


def cfg_with(**sections):
    return config.from_dict(config.deep_merge(UNIT, sections))


CELL = config.Cell("digits", "cnn", "linf", "trades", True, 0)


def test_train_writes_checkpoints_and_record(tmp_path):
    rec = train.train_cell(cfg_with(), CELL, tmp_path)
    assert [h["epoch"] for h in rec["history"]] == [1, 2]
    assert rec["history"][0]["lr"] == pytest.approx(0.05) and rec["history"][1]["lr"] == pytest.approx(0.005)
    h = rec["history"][0]
    assert h["loss_total"] == pytest.approx(h["loss_ce"] + h["loss_trades_kl_weighted"] + h["loss_rpat_weighted"],
                                            rel=1e-5)
    assert json.loads((tmp_path / "train.json").read_text())["selection"]["rule"] == "val"
    for name in ("checkpoint-best.pt", "checkpoint-last.pt"):
        ck = checkpoint.load(tmp_path / name)  # weights_only=True inside
        assert ck["model_name"] == "cnn" and ck["num_classes"] == 10
    assert checkpoint.load(tmp_path / "checkpoint-best.pt")["epoch"] == rec["selection"]["best_epoch"]


@pytest.mark.parametrize("method", ["trades", "rebat"])
def test_interrupted_training_resumes_exactly(tmp_path, monkeypatch, method):
    cfg = cfg_with()
    cell = config.Cell("digits", "cnn", "linf", method, True, 0)
    straight = train.train_cell(cfg, cell, tmp_path / "straight")

    calls = {"n": 0}
    real = accuracy.accuracies

    def dies_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed after epoch 2's training, before its state was saved
        return real(*args, **kwargs)

    monkeypatch.setattr(accuracy, "accuracies", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train.train_cell(cfg, cell, tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / "state" / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(accuracy, "accuracies", real)
    resumed = train.train_cell(cfg, cell, tmp_path / "resumed")

    a = checkpoint.load(tmp_path / "straight" / "checkpoint-last.pt")["model"]
    b = checkpoint.load(tmp_path / "resumed" / "checkpoint-last.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight["history"][1]["loss_total"] == resumed["history"][1]["loss_total"]


def test_changed_settings_start_from_scratch(tmp_path, capsys):
    train.train_cell(cfg_with(), CELL, tmp_path)
    rec = train.train_cell(cfg_with(train={"lr": 0.01}), CELL, tmp_path)
    assert "training from scratch" in capsys.readouterr().err
    assert rec["history"][0]["lr"] == pytest.approx(0.01)


def test_non_finite_loss_stops_with_epoch_and_step(tmp_path):
    with pytest.raises(train.NonFiniteLoss, match=r"epoch 1, step \d+"):
        train.train_cell(cfg_with(train={"lr": 1e30, "schedule": {"name": "constant"}}), CELL, tmp_path)
    assert not (tmp_path / "train.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_request_without_gpu_is_an_error_before_work(tmp_path):
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        train.train_cell(cfg_with(train={"device": "cuda"}), CELL, tmp_path)
    assert not any(tmp_path.iterdir())


def test_truncated_checkpoint_names_the_file(tmp_path):
    cfg = cfg_with()
    train.train_cell(cfg, CELL, tmp_path)
    ck = tmp_path / "checkpoint-best.pt"
    ck.write_bytes(ck.read_bytes()[:1000])
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint-best.pt cannot be read"):
        evaluate.evaluate_cell(cfg, CELL, tmp_path)


def test_foreign_checkpoint_is_refused(tmp_path):
    p = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, p)
    with pytest.raises(checkpoint.CheckpointError, match="not an rpat checkpoint"):
        checkpoint.load(p)


def test_evaluate_writes_metrics_in_order(tmp_path):
    cfg = cfg_with()
    train.train_cell(cfg, CELL, tmp_path)
    res = evaluate.evaluate_cell(cfg, CELL, tmp_path)
    assert res["n_examples"] == 16
    assert 0 <= res["pgd20"] <= res["clean"] <= 100
    assert 0 <= res["cw"] <= 100
    assert res["aa"] is None and res["mean"] is None
    assert json.loads((tmp_path / "eval.json").read_text())["clean"] == res["clean"]


def test_summary_metrics():
    assert measurements.summary_metrics(80.0, 40.0) == (60.0, pytest.approx(2 * 80 * 40 / 120))
    assert measurements.summary_metrics(0.0, 0.0) == (0.0, 0.0)


def test_cli_info_lists_registries_with_decision_param_counts():
    out = subprocess.run([sys.executable, "-m", "rpat", "info", "--json"], capture_output=True, text=True,
                         check=True)
    info = json.loads(out.stdout)
    params = {m["name"]: m["params_10_classes"] for m in info["models"]}
    assert params["resnet18"] == 11_173_962
    assert params["resnet18_bottleneck"] == 13_958_986
    assert params["preact_resnet18"] == 11_172_170
    assert params["wrn34_10"] == 46_160_474
    assert params["wrn28_10"] == 36_479_194
    assert {d["name"] for d in info["datasets"]} >= {"digits", "cifar10", "cifar100", "tinyimagenet", "imagefolder"}
    assert {o["name"] for o in info["objectives"]} >= {"ce", "noise", "pgd_at", "trades", "mart", "consistency",
                                                       "rebat"}
    assert info["attacks"]["norms"] == ["linf", "l2"]


def test_cli_reports_a_cell_outside_the_grid():
    out = subprocess.run([sys.executable, "-m", "rpat", "train", "--config", "config/config.yaml", "--cell",
                          "digits/cnn/linf/mart/seed0"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "not in the grid" in out.stderr


def test_signal_mid_epoch_saves_and_resumes_exactly(tmp_path, monkeypatch):
    """SIGTERM in the middle of an epoch: the job saves within the epoch, exits 75, resumes bit-exactly."""
    cfg = cfg_with(data={"train_subset": 256})  # 4 batches per epoch
    cell = config.Cell("digits", "cnn", "linf", "rebat", True, 0)
    train.train_cell(cfg, cell, tmp_path / "straight")

    restore = signal_at_step(monkeypatch, 6)  # epoch 2, step 2 of 4
    with pytest.raises(train.Preempted, match=r"SIGTERM at epoch 2, step 2/4") as e:
        train.train_cell(cfg, cell, tmp_path / "resumed")
    assert e.value.exit_code == 75
    state = torch.load(tmp_path / "resumed" / "state" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["partial"]["step"] == 2
    restore()
    train.train_cell(cfg, cell, tmp_path / "resumed")

    a = checkpoint.load(tmp_path / "straight" / "checkpoint-last.pt")["model"]
    b = checkpoint.load(tmp_path / "resumed" / "checkpoint-last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = json.loads((tmp_path / "straight" / "train.json").read_text())["history"]
    hb = json.loads((tmp_path / "resumed" / "train.json").read_text())["history"]
    assert [h["loss_total"] for h in ha] == [h["loss_total"] for h in hb]


@pytest.mark.parametrize("method", ["pgd_at", "trades", "mart", "consistency"])
def test_channels_last_gives_the_same_float32_losses(method):
    """Same weights, same inputs: the loss and its parts agree to float32 rounding (oneDNN's channels-last
    kernels sum in another order, so whole training runs drift apart chaotically, not systematically)."""
    from rpat import models, objectives

    torch.manual_seed(0)
    net = models.build("cnn", num_classes=10, in_channels=3, image_size=16).train()
    fast = models.build("cnn", num_classes=10, in_channels=3, image_size=16).train()
    fast.load_state_dict(net.state_dict())
    fast = fast.to(memory_format=torch.channels_last)
    x = torch.rand(8, 3, 16, 16)
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    y = torch.arange(8) % 10
    obj = objectives.OBJECTIVES[method]
    if obj.views == 2:
        x, x_adv, y = torch.cat([x, x.flip(0)]), torch.cat([x_adv, x_adv.flip(0)]), y.repeat(2)
    rp = {"weight": 1.0, "clean_weight": 0.5}
    la, pa = objectives.compute_loss(obj, net, x, y, x_adv, rpat=rp)
    lb, pb = objectives.compute_loss(obj, fast, x, y, x_adv, rpat=rp)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert float(pb[k].detach()) == pytest.approx(float(pa[k].detach()), rel=1e-5, abs=1e-6), k
    la.backward()
    lb.backward()
    for p, q in zip(net.parameters(), fast.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_prepare_data_cli_on_an_image_folder(tmp_path):
    """The workflow's prepare_data job: decode (and cache) an on-disk data set once, write its summary."""
    from PIL import Image

    for split, n in (("train", 6), ("test", 2)):
        for c in ("cat", "dog"):
            d = tmp_path / "folder" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (40 * i, 100 if c == "cat" else 200, 7)).save(d / f"{i}.png")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"experiment": "x", "grid": [{"dataset": ["imagefolder"], "model": ["cnn"],
                                                            "norm": ["linf"], "method": ["pgd_at"], "rpat": [False],
                                                            "seed": [0]}],
                               "data": {"paths": {"imagefolder": str(tmp_path / "folder")}, "val_size": 2}}))
    out = subprocess.run([sys.executable, "-m", "rpat", "prepare-data", "--config", str(cfg), "--dataset",
                          "imagefolder", "--out", str(tmp_path / "ready.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "ready.json").read_text())
    assert summary == {"dataset": "imagefolder", "train": 12, "test": 4, "num_classes": 2, "image_size": 8}
    assert list((tmp_path / "folder" / ".rpat-cache").glob("*.pt"))
