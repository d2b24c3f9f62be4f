"""Subsets of a split (data.train_subset, eval.n_examples): class-stratified draws vs the first N in file order."""

import pytest
import torch
from PIL import Image

from rpat import config, schema
from rpat.data import DATASETS, SUBSETS, eval_subset, first_n, load_splits, seeded_permutation, stratified_subset
from rpat.data.subsets import class_quotas
from rpat.errors import DataProblem, UnknownName


def _labels(*counts):
    return torch.cat([torch.full((m,), c) for c, m in enumerate(counts)])


# ---------------------------------------------------------------------------------------------
# the pure functions


@pytest.mark.parametrize("counts, n, quotas", [
    ((40, 30, 20, 10), 10, [4, 3, 2, 1]),  # exact shares
    ((40, 30, 20, 10), 7, [3, 2, 1, 1]),  # 2.8 2.1 1.4 0.7: floors 2 2 1 0, the two largest remainders +1
    ((20, 10, 6, 4), 10, [5, 3, 1, 1]),  # 5 2.5 1.5 1: the tie between classes 1 and 2 goes to class 1
    ((6, 3, 1), 5, [3, 2, 0]),  # 3 1.5 0.5: a class of 1 in 10 gets none of 5
    ((5, 5), 10, [5, 5]),  # everything
])
def test_class_quotas_largest_remainder(counts, n, quotas):
    assert class_quotas(_labels(*counts), n).tolist() == quotas


def test_stratified_subset_draws_each_class_quota_without_repeats():
    y = _labels(40, 30, 20, 10)[seeded_permutation(100, 5)]  # shuffled labels
    idx = stratified_subset(y, 7, seed=3)
    assert idx.dtype == torch.int64 and torch.equal(idx, idx.sort().values) and len(idx.unique()) == 7
    assert torch.bincount(y[idx], minlength=4).tolist() == [3, 2, 1, 1]


def test_stratified_subset_is_a_function_of_labels_size_and_seed():
    y = _labels(25, 25, 25, 25)
    a = stratified_subset(y, 20, seed=0)
    assert torch.equal(a, stratified_subset(y.clone(), 20, seed=0))
    b = stratified_subset(y, 20, seed=1)
    assert not torch.equal(a, b)
    assert torch.bincount(y[a]).tolist() == torch.bincount(y[b]).tolist() == [5, 5, 5, 5]
    # within a class: the class's first members in the order of the seeded permutation
    perm = seeded_permutation(100, 0)
    for c in range(4):
        assert a[y[a] == c].tolist() == sorted(perm[y[perm] == c][:5].tolist())


def test_first_n_is_the_head_of_the_file_order():
    y = _labels(25, 25, 25, 25)
    assert torch.equal(first_n(y, 10), torch.arange(10))
    assert set(SUBSETS) == {"stratified", "first"}


@pytest.mark.parametrize("n", [0, 101])
def test_subset_size_out_of_range(n):
    y = _labels(50, 50)
    for fn in (stratified_subset, first_n):
        with pytest.raises(ValueError, match=f"cannot take {n} of 100"):
            fn(y, n, 0)


def test_eval_subset_contract():
    y = _labels(20, 10, 6, 4)
    assert torch.equal(eval_subset(y, None), torch.arange(40))  # no n: every example
    assert torch.bincount(y[eval_subset(y, 10)]).tolist() == [5, 3, 1, 1]  # default: stratified, seed 0
    assert torch.equal(eval_subset(y, 10, "stratified", 0), stratified_subset(y, 10, 0))
    assert torch.equal(eval_subset(y, 10, "first", 7), torch.arange(10))
    with pytest.raises(DataProblem) as err:
        eval_subset(y, 41, "stratified", 0, what="the test set of 'imagefolder'")
    assert str(err.value) == (
        "eval.n_examples=41, but the test set of 'imagefolder' holds 40 examples. To fix: set eval.n_examples to "
        "at most 40 (or null for all of them)."
    )
    with pytest.raises(UnknownName, match="eval.n_examples.*stratified, first"):
        eval_subset(y, 10, "random", 0)


# ---------------------------------------------------------------------------------------------
# a class-sorted image folder (the layout of the CIFAR-10 JPEG folders, Tiny-ImageNet, any imagefolder)

TRAIN_COUNTS, TEST_COUNTS = (40, 30, 20, 10), (20, 10, 6, 4)


@pytest.fixture(scope="module")
def sorted_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sorted") / "imagefolder"
    for split, counts in (("train", TRAIN_COUNTS), ("test", TEST_COUNTS)):
        for k, m in enumerate(counts):
            for i in range(m):
                path = root / split / f"class{k}" / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (4, 4), (50 * k, i, 0)).save(path)
    return {"paths": {"imagefolder": str(root)}, "cache": False}


def test_train_subset_of_a_class_sorted_folder_holds_every_class_in_proportion(sorted_folder):
    s = load_splits("imagefolder", {**sorted_folder, "val_size": 0, "train_subset": 10})
    assert torch.bincount(s.train[1], minlength=4).tolist() == [4, 3, 2, 1]
    s = load_splits("imagefolder", {**sorted_folder, "val_size": 0, "train_subset": 7, "subset": "stratified"})
    assert torch.bincount(s.train[1], minlength=4).tolist() == [3, 2, 1, 1]
    assert torch.equal(s.train[0][:, 0, 0, 0].long() // 50, s.train[1])  # images stay with their labels


def test_train_subset_is_drawn_from_what_the_validation_split_leaves(sorted_folder):
    options = {**sorted_folder, "val_size": 20, "split_seed": 4}
    rest = load_splits("imagefolder", options)
    s = load_splits("imagefolder", {**options, "train_subset": 30})
    assert torch.equal(s.val[0], rest.val[0])  # the validation split does not depend on the subset
    train_rows = {r.numpy().tobytes() for r in s.train[0]}
    assert train_rows <= {r.numpy().tobytes() for r in rest.train[0]}  # drawn from the remaining 80
    left = torch.bincount(rest.train[1], minlength=4)
    got = torch.bincount(s.train[1], minlength=4)
    assert int(got.sum()) == 30 and (got - 30 * left / 80).abs().max() < 1
    again = load_splits("imagefolder", {**options, "train_subset": 30})
    assert torch.equal(again.train[0], s.train[0])  # every cell of a grid trains on the same images


def test_first_subset_reproduces_the_file_order_head(sorted_folder):
    s = load_splits("imagefolder", {**sorted_folder, "val_size": 10, "split_seed": 2, "train_subset": 12,
                                    "subset": "first"})
    full = DATASETS["imagefolder"].load(sorted_folder)
    perm = seeded_permutation(100, 2)  # the behaviour before stratified subsets existed
    expected = perm[10:].sort().values[:12]
    assert torch.equal(s.train[0], full.train[0][expected])
    assert torch.bincount(s.train[1], minlength=4).tolist() == [12, 0, 0, 0]  # why it is not the default


def test_eval_subset_of_a_class_sorted_test_set(sorted_folder):
    ty = DATASETS["imagefolder"].load(sorted_folder).test[1]
    assert torch.bincount(ty[eval_subset(ty, 10, "stratified", 0)], minlength=4).tolist() == [5, 3, 1, 1]
    assert torch.bincount(ty[eval_subset(ty, 10, "first", 0)], minlength=4).tolist() == [10, 0, 0, 0]


def test_train_subset_larger_than_the_training_set(sorted_folder):
    with pytest.raises(DataProblem) as err:
        load_splits("imagefolder", {**sorted_folder, "val_size": 20, "train_subset": 81})
    msg = str(err.value)
    assert "data.train_subset=81" in msg and "holds 80 examples" in msg and "data.val_size=20" in msg
    assert "To fix: set data.train_subset to at most 80" in msg


# ---------------------------------------------------------------------------------------------
# config keys


def test_subset_keys_have_defaults_and_schema_enums():
    assert config.DEFAULTS["data"]["subset"] == "stratified"
    assert (config.DEFAULTS["eval"]["subset"], config.DEFAULTS["eval"]["subset_seed"]) == ("stratified", 0)
    sections = schema.schema()["$defs"]["sections"]
    assert sections["data"]["properties"]["subset"]["enum"] == list(SUBSETS)
    assert sections["eval"]["properties"]["subset"]["enum"] == list(SUBSETS)
    grid = [{"dataset": ["digits"], "model": ["cnn"], "norm": ["linf"], "method": ["pgd_at"], "rpat": [False],
             "seed": [0]}]
    cfg = config.from_dict({"experiment": "x", "grid": grid, "data": {"subset": "first"},
                            "eval": {"subset": "first", "subset_seed": 3}})
    resolved = cfg.resolve(cfg.cells()[0])
    assert resolved["data"]["subset"] == "first" and resolved["eval"]["subset_seed"] == 3
    allowed = "data.subset: 'random' is not allowed; allowed values: stratified, first"
    with pytest.raises(config.ConfigError, match=allowed):
        config.from_dict({"experiment": "x", "grid": grid, "data": {"subset": "random"}})
