"""What MLflow holds of a trained cell besides metrics: the experiment's kind (so the UI opens on its runs), short
run names with the full cell in tags, the training data as run inputs (name, split, digest), and the selected
checkpoint as a logged model that loads back and computes the checkpoint's logits, registered only when asked."""

import hashlib
import json

import mlflow.pytorch
import pytest
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient
from tiny import tiny_config, tiny_grid

from rpat import cells, config, data, tracking, train
from rpat.jobs import evaluate

REGISTERED = "tiny-rpat"


def trained(root, **tracking_changes):
    """The tiny grid (pgd_at with and without RPAT) trained into ``root`` with a SQLite store there."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = config.from_dict(tiny_config(experiment="models", results_dir=str(root / "results"),
                                       tracking={"uri": uri, **tracking_changes}))
    records = {cell: train.train_cell(cfg, cell, cfg.run_dir(cell)) for cell in cfg.cells()}
    return cfg, MlflowClient(tracking_uri=uri), records


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    return trained(tmp_path_factory.mktemp("registered"), register_model=REGISTERED)


def test_the_experiment_is_a_model_training_one_and_runs_have_short_unique_names(registered):
    cfg, client, records = registered
    exp = client.get_experiment_by_name("models")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {rec["mlflow_run_id"] for rec in records.values()}
    by_cell = {r.data.tags["cell"]: r for r in runs.values()}
    assert {c.id: by_cell[c.id].info.run_name for c in cfg.cells()} == {
        "digits/cnn/linf/pgd_at/seed0": "pgd_at s0", "digits/cnn/linf/pgd_at+rpat/seed0": "pgd_at+rpat s0"}
    for cell in cfg.cells():
        assert by_cell[cell.id].data.tags.items() >= cell.tags().items()  # the full cell and each coordinate


def test_run_names_name_only_the_axes_the_grid_varies():
    cfg = config.from_dict(tiny_config(grid=tiny_grid(norm=["linf", "l2"], seed=[0, 1]),
                                       threat={"l2": {"eps": 1.0, "step": 0.3, "steps": 2}}))
    names = [cfg.settings(c).run_name for c in cfg.cells()]
    assert len(names) == 8 and len(set(names)) == 8
    assert cfg.settings(cells.Cell.parse("digits/cnn/l2/pgd_at+rpat/seed1")).run_name == "l2 pgd_at+rpat s1"
    assert cells.varying_axes(cfg.cells()) == ("norm",)
    every = cells.Cell("cifar10", "wrn34_10", "linf", "trades", True, 2, "ema")
    assert cells.run_name(every) == "cifar10 wrn34_10 linf trades+rpat+ema s2"


def test_each_run_records_its_training_data_as_inputs(registered):
    cfg, client, records = registered
    cell = cfg.cells()[0]
    splits = data.load_splits("digits", cfg.settings(cell).data.options())
    expected = {}
    for split in ("train", "val"):
        x, y = getattr(splits, split)
        expected[split] = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()
    assert len(expected["train"]) == 64 and expected["train"] != expected["val"]
    for rec in records.values():
        inputs = client.get_run(rec["mlflow_run_id"]).inputs.dataset_inputs
        got = {i.tags[0].value: (i.dataset.name, i.dataset.digest) for i in inputs if i.tags[0].value != "test"}
        assert got == {s: ("digits", d[:tracking.DATASET_DIGEST_CHARS]) for s, d in expected.items()}


def test_evaluation_adds_the_test_examples_it_measured_as_an_input(registered):
    cfg, client, records = registered
    cell = cfg.cells()[0]
    result = evaluate.evaluate_cell(cfg, cell, cfg.run_dir(cell))
    index = evaluate.evaluated_examples(cfg.settings(cell))[2]
    digest = hashlib.sha256(index.numpy().astype("int64").tobytes()).hexdigest()
    assert result["examples"]["digest"] == digest
    inputs = client.get_run(records[cell]["mlflow_run_id"]).inputs.dataset_inputs
    test = [i.dataset for i in inputs if i.tags[0].value == "test"]
    assert [(d.name, d.digest) for d in test] == [("digits", digest[:tracking.DATASET_DIGEST_CHARS])]
    assert json.loads(test[0].profile) == {"num_rows": 16}


def test_the_selected_checkpoint_is_the_runs_model_and_gives_its_logits(registered):
    cfg, client, records = registered
    for cell, rec in records.items():
        run = client.get_run(rec["mlflow_run_id"])
        (output,) = run.outputs.model_outputs
        assert output.step == rec["selection"]["best_epoch"]
        model = client.get_logged_model(output.model_id)
        assert model.tags["cell"] == cell.id and model.status == LoggedModelStatus.READY
        assert model.experiment_id == run.info.experiment_id and model.source_run_id == run.info.run_id
        logged = mlflow.pytorch.load_model(model.artifact_location)  # what models:/<id> resolves to
        own, _ = evaluate.load_model(cfg.run_dir(cell) / "checkpoint-best.pt", "cpu")
        x, _, _ = evaluate.evaluated_examples(cfg.settings(cell))  # 16 real test images, a batch size never seen
        with torch.no_grad():
            expected = own(x)
            assert expected.shape == (16, 10)
            assert torch.allclose(logged(x), expected, atol=1e-6)


def test_registering_is_opt_in(registered, tmp_path):
    cfg, client, records = registered
    versions = client.search_model_versions(f"name = '{REGISTERED}'")
    assert sorted(v.tags["cell"] for v in versions) == sorted(c.id for c in cfg.cells())
    assert {v.run_id for v in versions} == {rec["mlflow_run_id"] for rec in records.values()}

    cfg, client, records = trained(tmp_path)
    assert client.search_registered_models() == []
    for rec in records.values():  # logged all the same
        assert len(client.get_run(rec["mlflow_run_id"]).outputs.model_outputs) == 1

    off = config.from_dict(tiny_config(experiment="models", results_dir=str(tmp_path / "off"),
                                       grid=tiny_grid(rpat=[False]),
                                       tracking={"uri": cfg.tracking["uri"], "log_model": False}))
    rec = train.train_cell(off, off.cells()[0], off.run_dir(off.cells()[0]))
    assert client.get_run(rec["mlflow_run_id"]).outputs.model_outputs == []
