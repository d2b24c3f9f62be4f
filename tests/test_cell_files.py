"""CellFiles (rpat/cells.py): the one place that names a cell's files, for the jobs, the CLI and the workflow."""

from pathlib import Path

import pytest

from rpat.cells import Cell, CellFiles

CELL = Cell.parse("digits/cnn/linf/trades+rpat/seed0")


def test_a_cell_s_files_live_in_its_run_directory():
    f = CellFiles.of("results", CELL)
    run = Path("results/runs/digits/cnn/linf/trades+rpat/seed0")
    assert f.run == run
    assert (f.train_record, f.progress, f.training_state) == (run / "train.json", run / "progress.json", run / "state")
    assert f.checkpoint("best") == run / "checkpoint-best.pt" == run / CellFiles.checkpoint_name("best")
    assert (f.perception, f.perception_values) == (run / "perception.json", run / "perception.npz")
    assert (f.curve, f.curve_outcomes) == (run / "curve.json", run / "curve.npz")
    assert f.log("train") == Path("results/logs/train/digits/cnn/linf/trades+rpat/seed0.log")
    assert f.log("evaluate", "-last") == Path("results/logs/evaluate/digits/cnn/linf/trades+rpat/seed0-last.log")


def test_the_primary_checkpoint_s_evaluation_has_no_tag():
    f = CellFiles.of("results", CELL)
    assert f.evaluation("best", "best") == f.primary_evaluation == f.run / "eval.json"
    assert f.outcomes("best", "best") == f.run / "outcomes.npz"
    assert f.evaluation("last", "best") == f.run / "eval-last.json"
    assert f.outcomes("last", "best") == f.run / "outcomes-last.npz"
    for which in ("best", "last"):
        tag = CellFiles.tag(which, "best")
        assert CellFiles.checkpoint_of_tag(tag, "best") == which
        assert CellFiles.outcomes_beside(f.tagged_evaluation(tag)) == f.outcomes(which, "best")


def test_shards_saved_progress_and_twins():
    f = CellFiles.of("results", CELL)
    assert f.shard_result("best", 2, 4) == f.run / "eval-shards" / "best-2of4.json"
    assert f.shard_outcomes("best", 2, 4) == f.run / "eval-shards" / "best-2of4.npz"
    assert f.evaluation_state("best") == f.run / "eval-state" / "best.pt"
    assert f.evaluation_state("last", 1, 2) == f.run / "eval-state" / "last-1of2.pt"
    assert f.curve_state("best") == f.run / "eval-state" / "curve-best.pt"
    assert CellFiles.outcomes_beside("elsewhere/mine.json") == Path("elsewhere/mine.npz")


def test_patterns_for_the_workflow_and_a_run_directory_given_by_hand(tmp_path):
    p = CellFiles.pattern("results")
    cell_dir = "results/runs/{dataset}/{model}/{norm}/{method}/seed{seed}"
    assert str(p.checkpoint("{which}")) == f"{cell_dir}/checkpoint-{{which}}.pt"
    assert str(p.tagged_evaluation("{tag}")).endswith("seed{seed}/eval{tag}.json")
    assert str(p.log("perceive")) == "results/logs/perceive/{dataset}/{model}/{norm}/{method}/seed{seed}.log"
    by_hand = CellFiles.beside(tmp_path / "train.json")
    assert by_hand.run == tmp_path and by_hand.train_record == tmp_path / "train.json"
    with pytest.raises(ValueError, match="no logs"):
        by_hand.log("train")


def test_the_config_names_its_cells_files(tmp_path):
    from tiny import tiny_config

    from rpat import config

    cfg = config.from_dict({**tiny_config(), "results_dir": str(tmp_path)})
    cell = cfg.cells()[0]
    assert cfg.files(cell) == CellFiles.of(tmp_path, cell) and cfg.run_dir(cell) == cfg.files(cell).run
