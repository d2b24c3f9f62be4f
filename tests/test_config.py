"""Config loading, schema validation with helpful messages, grid expansion, resolution."""

import copy
import json

import pytest

from rpat import config as C

BASE = {
    "experiment": "t",
    "grid": [{"dataset": ["digits"], "model": ["cnn"], "norm": ["linf"], "method": ["pgd_at", "trades"],
              "rpat": [False, True], "seed": [0, 1]}],
}


def with_changes(**changes):
    cfg = copy.deepcopy(BASE)
    for path, value in changes.items():
        node = cfg
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
        node[keys[-1]] = value
    return cfg


def error_of(raw) -> str:
    with pytest.raises(C.ConfigError) as e:
        C.from_dict(raw)
    return str(e.value)


def test_default_config_is_valid_and_has_the_demo_grid():
    cfg = C.load("config/config.yaml")
    assert [c.id for c in cfg.cells()] == [
        "digits/cnn/linf/pgd_at/seed0",
        "digits/cnn/linf/pgd_at+rpat/seed0",
        "digits/cnn/linf/trades/seed0",
        "digits/cnn/linf/trades+rpat/seed0",
    ]


def test_grid_expands_to_the_product():
    cells = C.from_dict(BASE).cells()
    assert len(cells) == 2 * 2 * 2
    assert len(set(cells)) == 8


def test_unknown_top_level_key_names_it_and_the_allowed_keys():
    msg = error_of(with_changes(trian={"epochs": 3}))
    assert "unknown key 'trian'" in msg
    assert "train" in msg and "threat" in msg


def test_unknown_nested_key():
    msg = error_of(with_changes(train={"epochz": 3}))
    assert "unknown key 'epochz' in train" in msg
    assert "epochs" in msg


@pytest.mark.parametrize("key,value,registered", [
    ("method", ["pgd_at", "fgsm_at"], "trades"),
    ("model", ["resnet50"], "preact_resnet18"),
    ("dataset", ["mnist"], "cifar10"),
    ("norm", ["l1"], "linf"),
])
def test_unknown_registry_name_lists_allowed_values(key, value, registered):
    raw = copy.deepcopy(BASE)
    raw["grid"][0][key] = value
    msg = error_of(raw)
    assert f"grid[0].{key}" in msg
    assert repr(value[-1]) in msg
    assert registered in msg


def test_negative_eps_is_rejected_with_its_key():
    msg = error_of(with_changes(threat={"linf": {"eps": -0.1}}))
    assert "threat.linf.eps" in msg
    assert "-0.1" in msg


def test_fractions_are_parsed():
    cfg = C.from_dict(with_changes(threat={"linf": {"eps": "8/255", "step": "2 / 255"}}))
    t = cfg.resolve(cfg.cells()[0])["threat"]["linf"]
    assert t["eps"] == pytest.approx(8 / 255)
    assert t["step"] == pytest.approx(2 / 255)


def test_negative_fraction_is_rejected():
    assert "threat.linf.eps" in error_of(with_changes(threat={"linf": {"eps": "-8/255"}}))


def test_method_hyperparameters_are_validated_per_method():
    assert "unknown key 'gamma' in methods.trades" in error_of(with_changes(methods={"trades": {"gamma": 1}}))
    assert "methods.rebat.attack_bn" in error_of(with_changes(methods={"rebat": {"attack_bn": "frozen"}}))


def test_rpat_on_a_method_without_rpat_is_rejected():
    raw = copy.deepcopy(BASE)
    raw["grid"][0]["method"] = ["ce"]
    assert "method 'ce' has no RPAT variant" in error_of(raw)


def test_rpat_start_after_last_epoch_is_rejected():
    msg = error_of(with_changes(train={"epochs": 5}, rpat={"start_epoch": 9}))
    assert "rpat.start_epoch=9" in msg and "(5)" in msg


def test_block_set_overrides_sections_for_its_cells_only():
    raw = copy.deepcopy(BASE)
    raw["train"] = {"epochs": 7}
    raw["grid"].append({"dataset": ["digits"], "model": ["cnn"], "norm": ["l2"], "method": ["mart"],
                        "rpat": [True], "seed": [0], "set": {"train": {"epochs": 3}, "rpat": {"weight": 2.0}}})
    cfg = C.from_dict(raw)
    a = cfg.resolve(C.Cell("digits", "cnn", "linf", "pgd_at", True, 0))
    b = cfg.resolve(C.Cell("digits", "cnn", "l2", "mart", True, 0))
    assert a["train"]["epochs"] == 7 and a["rpat"]["weight"] == 1.0
    assert b["train"]["epochs"] == 3 and b["rpat"]["weight"] == 2.0
    assert b["train"]["lr"] == C.DEFAULTS["train"]["lr"]  # deep merge keeps untouched defaults


def test_conflicting_blocks_are_rejected():
    raw = copy.deepcopy(BASE)
    raw["grid"].append({**copy.deepcopy(BASE["grid"][0]), "set": {"train": {"epochs": 2}}})
    assert "different `set`" in error_of(raw)


def test_defaults_follow_the_paper():
    r = C.from_dict(BASE).resolve(C.Cell("digits", "cnn", "linf", "trades", True, 0))
    assert r["threat"]["linf"] == {"eps": pytest.approx(8 / 255), "step": pytest.approx(2 / 255), "steps": 10}
    assert r["threat"]["l2"]["eps"] == pytest.approx(128 / 255)
    assert r["methods"]["trades"]["beta"] == 6.0
    assert r["methods"]["rebat"]["beta"] == 1.0
    assert r["methods"]["consistency"] == {"weight": 1.0, "temperature": 0.5}
    assert r["rpat"] == {"weight": 1.0, "clean_weight": 0.5, "start_epoch": 1}
    assert r["train"]["schedule"]["milestones"] == [100, 105]


def test_cell_id_roundtrip():
    cell = C.Cell("cifar10", "preact_resnet18", "l2", "rebat", True, 3)
    assert cell.id == "cifar10/preact_resnet18/l2/rebat+rpat/seed3"
    assert C.Cell.parse(cell.id) == cell
    with pytest.raises(C.ConfigError):
        C.Cell.parse("cifar10/preact_resnet18/rebat")


def test_train_fingerprint_ignores_eval_and_resources_but_not_training():
    cfg = C.from_dict(BASE)
    cell = cfg.cells()[0]
    fp = cfg.settings(cell).train_fingerprint
    changed_eval = C.from_dict(with_changes(eval={"n_examples": 10}, resources={"default": {"gpu": 1}}))
    assert changed_eval.settings(cell).train_fingerprint == fp
    changed_lr = C.from_dict(with_changes(train={"lr": 0.01}))
    assert changed_lr.settings(cell).train_fingerprint != fp


def test_resources_by_dataset_then_model():
    raw = with_changes(resources={"default": {"gpu": 1, "mem_mb": 1000},
                                  "by_dataset": {"digits": {"mem_mb": 2000, "runtime": 5}},
                                  "by_model": {"cnn": {"runtime": 7}}})
    cfg = C.from_dict(raw)
    res = C.resources_for(cfg.resolve(cfg.cells()[0]))
    assert res == {"gpu": 1, "cpus": 1, "mem_mb": 2000, "runtime": 7, "processes": 1, "nodes": 1}


def test_processes_and_the_step_log_leave_the_fingerprint_alone():
    """A cell trained on 1 process resumes (and is done) on 4: the result depends on the seed, not on N."""
    cfg = C.from_dict(with_changes())
    cell = cfg.cells()[0]
    fp = cfg.settings(cell).train_fingerprint
    same = C.from_dict(with_changes(resources={"default": {"processes": 4, "nodes": 2}},
                                    train={"step_log": True, "sync_batchnorm": True}))
    assert same.settings(cell).train_fingerprint == fp
    local_bn = C.from_dict(with_changes(train={"sync_batchnorm": False}))
    assert local_bn.settings(cell).train_fingerprint != fp


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("experiment: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(C.ConfigError, match=r"evil.yaml, line 1, column 13: the YAML tag !!python/object/apply:os"):
        C.load(p)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(tmp_path / "nope.yaml")


def test_paper_and_all_methods_configs_are_valid():
    for path in ("config/paper.yaml", "config/all_methods.yaml"):
        cfg = C.load(path)
        assert cfg.cells()


def test_catalog_snapshot_matches_the_registries():
    from rpat import catalog

    assert catalog.catalog() == json.loads(json.dumps(catalog.build()))


def test_planning_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, rpat.config as c; c.load('config/paper.yaml'); print('torch' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)  # builds the catalog
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
