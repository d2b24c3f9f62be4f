"""Data tests (CPU, offline): registry, splits, augmentations, loaders, image-folder datasets and cache."""

import pytest
import torch
from PIL import Image

from rpat import data as D
from rpat.data import augment, folders, tinyimagenet
from rpat.data import (
    AUGMENTATIONS,
    DATASETS,
    Batches,
    autoaugment_cutout,
    cutout,
    dataset_info,
    load_splits,
    prepare_tinyimagenet,
    random_crop_flip,
)
from rpat.errors import DataProblem

# ---------------------------------------------------------------------------------------------
# registry


def test_dataset_info_lists_every_registered_dataset():
    info = dataset_info()
    assert [d["name"] for d in info] == list(DATASETS)
    assert {"digits", "cifar10", "cifar100", "tinyimagenet", "imagefolder"} <= set(DATASETS)
    by_name = {d["name"]: d for d in info}
    assert (by_name["cifar10"]["num_classes"], by_name["cifar10"]["image_size"]) == (10, 32)
    assert (by_name["cifar100"]["num_classes"], by_name["cifar100"]["image_size"]) == (100, 32)
    assert (by_name["tinyimagenet"]["num_classes"], by_name["tinyimagenet"]["image_size"]) == (200, 64)
    assert by_name["imagefolder"]["num_classes"] is None
    for d in info:
        assert set(d) == {"name", "description", "num_classes", "image_size"} and d["description"]


def test_unknown_dataset_names_the_registered_ones():
    with pytest.raises(KeyError, match="digits"):
        load_splits("nope", {})


# ---------------------------------------------------------------------------------------------
# digits splits


def _rows(x):
    return {r.numpy().tobytes() for r in x.reshape(len(x), -1)}


def test_digits_splits_disjoint_and_sized():
    s = load_splits("digits", {"val_size": 100, "split_seed": 0})
    assert len(s.test[1]) == 400
    assert len(s.val[1]) == 100
    assert len(s.train[1]) == 1797 - 400 - 100
    train, val, test = _rows(s.train[0]), _rows(s.val[0]), _rows(s.test[0])  # the 1,797 images are distinct
    assert len(train) + len(val) + len(test) == 1797
    assert not (train & val) and not (train & test) and not (val & test)
    assert (s.num_classes, s.channels, s.image_size) == (10, 1, 8)
    assert s.train[0].dtype == torch.float32 and s.train[1].dtype == torch.int64


def test_digits_split_seed():
    a = load_splits("digits", {"val_size": 100, "split_seed": 0})
    b = load_splits("digits", {"val_size": 100, "split_seed": 0})
    c = load_splits("digits", {"val_size": 100, "split_seed": 1})
    assert torch.equal(a.val[0], b.val[0]) and torch.equal(a.train[0], b.train[0])
    assert not torch.equal(a.val[0], c.val[0])
    assert torch.equal(a.test[0], c.test[0])  # the test split belongs to the dataset, not the run


def test_train_subset_and_bad_val_size():
    s = load_splits("digits", {"val_size": 100, "train_subset": 50})
    assert len(s.train[1]) == 50 and len(s.val[1]) == 100
    with pytest.raises(DataProblem, match="val_size"):
        load_splits("digits", {"val_size": 5000})


# ---------------------------------------------------------------------------------------------
# augmentations


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_random_crop_flip_shape_range_determinism():
    x = torch.rand(16, 3, 32, 32, generator=_gen(1))
    a = random_crop_flip(x, _gen(7))
    b = random_crop_flip(x, _gen(7))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, random_crop_flip(x, _gen(8)))


def _zero_box(mask):
    """(height, width) of the zero region if it is exactly one axis-aligned rectangle, else None."""
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    if len(rows) == 0:
        return None
    box = torch.zeros_like(mask)
    box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
    if not torch.equal(box, mask):
        return None
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def test_cutout_zeroes_one_clipped_square():
    x = torch.ones(64, 3, 32, 32)
    out = cutout(x, _gen(3))
    for img in out:
        zero = img == 0
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])  # all channels
        h, w = _zero_box(zero[0])
        assert 8 <= h <= 16 and 8 <= w <= 16  # side 16, clipped at the border down to 8
    assert (out == 0).flatten(1).sum(1).eq(3 * 16 * 16).any()  # some squares are not clipped


def test_autoaugment_cutout_registered():
    assert AUGMENTATIONS["autoaugment_cutout"] is autoaugment_cutout


def test_autoaugment_cutout_shape_dtype_range_determinism():
    x = torch.rand(8, 3, 32, 32, generator=_gen(1))
    state = torch.get_rng_state()
    a = autoaugment_cutout(x, _gen(5))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    b = autoaugment_cutout(x, _gen(5))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, autoaugment_cutout(x, _gen(6)))


def test_autoaugment_cutout_zeroes_a_square(monkeypatch):
    # No crop (its zero padding would add zeros); on a mid-grey image no AutoAugment op of the CIFAR-10
    # policy yields 0 (fill is 128), so the only zeros are Cutout's square.
    monkeypatch.setattr(augment, "random_crop_flip", lambda x, generator=None: x)
    x = torch.full((32, 3, 32, 32), 128 / 255)
    out = autoaugment_cutout(x, _gen(0))
    for img in out:
        zero = (img == 0).all(0)
        assert torch.equal(zero, (img == 0).any(0))
        h, w = _zero_box(zero)
        assert 8 <= h <= 16 and 8 <= w <= 16
    assert (out != 128 / 255).logical_and(out != 0).any()  # AutoAugment changed some pixels


def test_autoaugment_cutout_grey_images():
    x = torch.rand(4, 1, 8, 8, generator=_gen(2))
    out = autoaugment_cutout(x, _gen(0))
    assert out.shape == x.shape


# ---------------------------------------------------------------------------------------------
# Batches


def test_batches_cover_every_example_once_per_epoch():
    n = 10
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    y = torch.arange(n)
    loader = Batches(x, y, 3, shuffle=True, generator=_gen(0))
    assert len(loader) == 4
    for _ in range(2):
        batches = list(loader)
        assert [len(b[1]) for b in batches] == [3, 3, 3, 1]
        ys = torch.cat([b[1] for b in batches])
        assert torch.equal(ys.sort().values, y)
        assert torch.equal(torch.cat([b[0] for b in batches]).flatten(), ys.float())  # x stays with its y


def test_batches_two_views_double_the_batch():
    x = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(10)
    loader = Batches(x, y, 4, shuffle=True, augment=random_crop_flip, views=2, generator=_gen(0))
    xb, yb = next(iter(loader))
    assert xb.shape == (8, 3, 8, 8) and xb.dtype == torch.float32
    assert torch.equal(yb[:4], yb[4:])
    assert not torch.equal(xb[:4], xb[4:])  # two independent augmentations
    assert sum(len(b[1]) for b in loader) == 20


# ---------------------------------------------------------------------------------------------
# CIFAR offline


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_offline_raises_with_searched_dir(tmp_path, name):
    with pytest.raises(DataProblem) as err:
        DATASETS[name].load({"root": str(tmp_path)})
    msg = str(err.value)
    assert str(tmp_path / name) in msg
    assert "data.download: true" in msg and f"data.paths.{name}" in msg


def _png(path, size, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, value).save(path)


def _cifar_like_tree(root, classes, n_train, n_test, size=(32, 32)):
    for k, c in enumerate(classes):
        for i in range(n_train):
            _png(root / "train" / c / f"{i:04d}.png", size, (10 * k, 5 * i, 7))
        for i in range(n_test):
            _png(root / "test" / c / f"{i:04d}.png", size, (10 * k, 5 * i, 7))


def test_cifar10_loads_an_image_folder(tmp_path):
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    root = tmp_path / "c10"
    _cifar_like_tree(root, classes, 2, 1)
    data = DATASETS["cifar10"].load({"paths": {"cifar10": str(root)}})
    assert data.classes == classes and data.num_classes == 10
    assert data.train[0].shape == (20, 3, 32, 32) and data.train[0].dtype == torch.uint8
    assert data.test[0].shape == (10, 3, 32, 32) and data.test[1].dtype == torch.int64
    assert torch.equal(data.train[0][:, 0, 0, 0], data.train[1] * 10)  # red channel encodes the class
    assert list(data.mean) == list(D.CIFAR10_MEAN)


def test_cifar10_image_folder_wrong_class_count(tmp_path):
    _cifar_like_tree(tmp_path / "cifar10", ["a", "b"], 1, 1)
    with pytest.raises(DataProblem, match="expected 10"):
        DATASETS["cifar10"].load({"root": str(tmp_path)})


# ---------------------------------------------------------------------------------------------
# imagefolder + cache


def _imagefolder(root, n_train=4, n_test=2, size=(8, 8)):
    for k, c in enumerate(["cat", "dog", "emu"]):
        for i in range(n_train):
            _png(root / "train" / c / f"{i}.png", size, (40 * k + i, 100, 200))
        for i in range(n_test):
            _png(root / "test" / c / f"{i}.png", size, (40 * k + i, 100, 200))


def test_imagefolder_loads_and_second_load_hits_cache(tmp_path, monkeypatch):
    root = tmp_path / "imagefolder"
    _imagefolder(root)
    options = {"root": str(tmp_path)}
    data = DATASETS["imagefolder"].load(options)
    assert data.num_classes == 3 and data.classes == ["cat", "dog", "emu"]
    assert data.train[0].shape == (12, 3, 8, 8) and data.train[0].dtype == torch.uint8
    assert data.test[0].shape == (6, 3, 8, 8)
    assert data.image_size == 8 and data.channels == 3
    for x, y in (data.train, data.test):
        assert y.dtype == torch.int64
        assert torch.equal(x[:, 0, 0, 0] // 40, y)  # the label matches the class folder
        assert torch.equal(x[:, 1], torch.full_like(x[:, 1], 100))
    red = data.train[0][:, 0].double() / 255
    assert data.mean == pytest.approx([red.mean().item(), 100 / 255, 200 / 255])
    assert data.std[0] == pytest.approx(red.std(unbiased=False).item())
    assert list((root / D.CACHE_DIRNAME).glob("*.pt"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(folders, "_decode_files", no_decoding)
    again = DATASETS["imagefolder"].load(options)
    assert torch.equal(again.train[0], data.train[0]) and torch.equal(again.test[1], data.test[1])

    # a changed folder is decoded again
    monkeypatch.undo()
    _png(root / "train" / "emu" / "extra.png", (8, 8), (90, 100, 200))
    changed = DATASETS["imagefolder"].load(options)
    assert len(changed.train[1]) == 13
    assert len(list((root / D.CACHE_DIRNAME).glob("train-*.pt"))) == 1  # the stale cache is gone


def test_imagefolder_splits(tmp_path):
    _imagefolder(tmp_path / "imagefolder")
    s = load_splits("imagefolder", {"root": str(tmp_path), "val_size": 3, "cache": False})
    assert (len(s.train[1]), len(s.val[1]), len(s.test[1])) == (9, 3, 6)
    assert s.num_classes == 3 and s.image_size == 8
    assert not (tmp_path / "imagefolder" / D.CACHE_DIRNAME).exists()


def test_imagefolder_rejects_images_of_another_size(tmp_path):
    root = tmp_path / "imagefolder"
    _imagefolder(root)
    bad = root / "train" / "dog" / "9.png"
    _png(bad, (8, 6), (0, 0, 0))
    with pytest.raises(DataProblem, match="9.png") as err:
        DATASETS["imagefolder"].load({"paths": {"imagefolder": str(root)}})
    assert "resize" in str(err.value)


def test_imagefolder_rejects_non_square(tmp_path):
    _imagefolder(tmp_path / "imagefolder", size=(8, 6))
    with pytest.raises(DataProblem, match="not square"):
        DATASETS["imagefolder"].load({"root": str(tmp_path)})


def test_imagefolder_missing(tmp_path):
    with pytest.raises(DataProblem, match="data.paths.imagefolder"):
        DATASETS["imagefolder"].load({"root": str(tmp_path)})


# ---------------------------------------------------------------------------------------------
# Tiny-ImageNet


def _jpeg(path, value, size=(64, 64), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def _fake_tiny(root, wnids, n_val_per_class=2, size=(64, 64)):
    lines = []
    for k, w in enumerate(wnids):
        _jpeg(root / "train" / w / "images" / f"{w}_0.JPEG", (k % 256, 0, 0), size)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")  # not an image: ignored
        for i in range(n_val_per_class):
            name = f"val_{k * n_val_per_class + i}.JPEG"
            _jpeg(root / "val" / "images" / name, (k % 256, 0, 0), size)
            lines.append(f"{name}\t{w}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def test_tinyimagenet_val_layout_is_idempotent(tmp_path):
    root = tmp_path / "tiny"
    _fake_tiny(root, ["n02", "n01"], size=(8, 8))
    assert prepare_tinyimagenet(root, download=False) == root
    expected = {
        "n01/images/val_2.JPEG",
        "n01/images/val_3.JPEG",
        "n02/images/val_0.JPEG",
        "n02/images/val_1.JPEG",
    }
    files = lambda: {p.relative_to(root / "val").as_posix() for p in (root / "val").rglob("*.JPEG")}  # noqa: E731
    assert files() == expected
    assert not (root / "val" / "images").exists()
    assert prepare_tinyimagenet(root, download=False) == root  # second run: nothing to do, nothing broken
    assert files() == expected


def test_tinyimagenet_val_layout_finishes_an_interrupted_run(tmp_path):
    root = tmp_path / "tiny"
    _fake_tiny(root, ["n01", "n02"], size=(8, 8))
    # an interrupted run moved one file
    (root / "val" / "n01" / "images").mkdir(parents=True)
    (root / "val" / "images" / "val_0.JPEG").rename(root / "val" / "n01" / "images" / "val_0.JPEG")
    prepare_tinyimagenet(root, download=False)
    assert sorted(p.name for p in (root / "val" / "n01" / "images").iterdir()) == ["val_0.JPEG", "val_1.JPEG"]
    assert sorted(p.name for p in (root / "val" / "n02" / "images").iterdir()) == ["val_2.JPEG", "val_3.JPEG"]
    assert not (root / "val" / "images").exists()


def test_tinyimagenet_missing_offline(tmp_path):
    with pytest.raises(DataProblem) as err:
        prepare_tinyimagenet(tmp_path / "nothing", download=False)
    assert str(tmp_path / "nothing") in str(err.value) and "data.download: true" in str(err.value)


def test_tinyimagenet_loads_from_the_official_zip_layout(tmp_path):
    wnids = [f"n{i:08d}" for i in range(200)]
    data_dir = tmp_path / "tinyimagenet" / "tiny-imagenet-200"  # as the zip unpacks
    _fake_tiny(data_dir, wnids[::-1], n_val_per_class=1)
    _jpeg(data_dir / "train" / wnids[5] / "images" / "grey.JPEG", 77, mode="L")  # converted to RGB
    data = DATASETS["tinyimagenet"].load({"root": str(tmp_path)})
    assert data.classes == wnids and data.num_classes == 200
    assert data.train[0].shape == (201, 3, 64, 64) and data.test[0].shape == (200, 3, 64, 64)
    assert torch.equal(data.test[1].sort().values, torch.arange(200))
    # folders were created in reverse order (red = 199 - label), classes are the sorted wnids; JPEG is lossy
    assert (data.test[0][:, 0, 32, 32].long() - (199 - data.test[1])).abs().max() <= 3
    assert (data.train[0][:, 1].float().mean((1, 2)) > 50).sum() == 1  # the grey image, as RGB


# ---------------------------------------------------------------------------------------------
# the real CIFAR-10 (JPEG archive, development data only)


@pytest.mark.slow
def test_cifar10_jpeg_archive(cifar10_jpeg_root):
    data = DATASETS["cifar10"].load({"paths": {"cifar10": str(cifar10_jpeg_root)}})
    x, y = data.train
    tx, ty = data.test
    assert x.shape == (50_000, 3, 32, 32) and tx.shape == (10_000, 3, 32, 32)
    assert x.dtype == torch.uint8 and y.dtype == torch.int64
    assert data.num_classes == 10 and len(data.classes) == 10 and data.classes[0] == "airplane"
    assert torch.equal(torch.bincount(y), torch.full((10,), 5000))
    assert torch.equal(torch.bincount(ty), torch.full((10,), 1000))
    s = load_splits("cifar10", {"paths": {"cifar10": str(cifar10_jpeg_root)}, "val_size": 1000})  # from the cache
    assert (len(s.train[1]), len(s.val[1]), len(s.test[1])) == (49_000, 1000, 10_000)


def _fake_tiny_zip(tmp_path) -> bytes:
    import io
    import zipfile

    src = tmp_path / "src" / "tiny-imagenet-200"
    _fake_tiny(src, ["n01", "n02"], size=(8, 8))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(src.rglob("*")):
            z.write(p, p.relative_to(src.parent).as_posix())
    return buf.getvalue()


def test_tinyimagenet_download_unpacks_and_lays_out(tmp_path, monkeypatch):
    import hashlib
    import io
    import urllib.request

    body = _fake_tiny_zip(tmp_path)
    requested = []

    class Response(io.BytesIO):
        def __init__(self, url):
            super().__init__(body)
            self.url, self.length = url, len(body)

    def fake_urlopen(request, timeout=None):
        url = getattr(request, "full_url", request)
        if getattr(request, "headers", {}).get("Method") != "HEAD":  # torchvision first asks for redirects
            requested.append(url)
        return Response(url)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setattr(tinyimagenet, "TINYIMAGENET_MD5", hashlib.md5(body).hexdigest())  # this fake's checksum
    root = tmp_path / "tinyimagenet"
    with pytest.warns(UserWarning, match="downloading"):
        data_dir = prepare_tinyimagenet(root, download=True)
    assert requested == [D.TINYIMAGENET_URL]
    assert data_dir == root / "tiny-imagenet-200"
    assert (data_dir / "val" / "n02" / "images" / "val_3.JPEG").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["tiny-imagenet-200"]  # no zip, part or staging left
    assert prepare_tinyimagenet(root, download=True) == data_dir and len(requested) == 1


def test_tinyimagenet_refuses_an_archive_with_the_wrong_checksum(tmp_path, monkeypatch):
    import hashlib
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("the local archive must be checked, not downloaded again")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    body = _fake_tiny_zip(tmp_path)  # a valid zip, but not the official one
    root = tmp_path / "tinyimagenet"
    root.mkdir()
    (root / "tiny-imagenet-200.zip").write_bytes(body)
    with pytest.raises(DataProblem) as err:
        prepare_tinyimagenet(root, download=True)
    msg = str(err.value)
    assert str(root / "tiny-imagenet-200.zip") in msg
    assert f"MD5 {hashlib.md5(body).hexdigest()}" in msg and "expected 90528d7ca1a48142e341f4ef8d21d0de" in msg
    assert "delete it" in msg and "data.download: true" in msg and D.TINYIMAGENET_URL in msg
    assert not (root / "tiny-imagenet-200").exists()  # nothing unpacked


# ---------------------------------------------------------------------------------------------
# bad data: one line (the CLI prints it) naming the file, folder or key, and the fix


def _noise_png(path, size=(16, 16), truncate=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=_gen(0)).numpy()
    Image.fromarray(noise).save(path)
    if truncate:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty_class(root):
    for f in (root / "train" / "emu").iterdir():
        f.unlink()
    return root / "train" / "emu", "holds no images", "To fix: put its images there, or delete the folder"


def _truncated_image(root):
    _noise_png(root / "train" / "dog" / "9.png", truncate=True)
    return root / "train" / "dog" / "9.png", "not a readable image", "To fix: replace this file"


def _not_an_image(root):
    (root / "test" / "cat" / "9.png").write_bytes(b"this is not a PNG")
    return root / "test" / "cat" / "9.png", "not a readable image", "To fix: replace this file"


def _test_class_not_in_train(root):
    _png(root / "test" / "yak" / "0.png", (16, 16), (0, 0, 0))
    return root / "test", "yak", "To fix: add their training images"


def _no_imagefolder(root):
    import shutil

    shutil.rmtree(root / "test")
    return root, "expected", "To fix: create that tree there, or point data.paths.imagefolder"


@pytest.mark.parametrize("spoil", [_empty_class, _truncated_image, _not_an_image, _test_class_not_in_train,
                                   _no_imagefolder])
def test_bad_image_folder_names_the_place_and_the_fix(tmp_path, spoil):
    root = tmp_path / "imagefolder"
    _imagefolder(root, size=(16, 16))
    place, problem, fix = spoil(root)
    with pytest.raises(DataProblem) as err:
        load_splits("imagefolder", {"root": str(tmp_path), "val_size": 3})
    msg = str(err.value)
    assert str(place) in msg and problem in msg and fix in msg and "\n" not in msg


def test_val_size_not_below_the_training_set(tmp_path):
    _imagefolder(tmp_path / "imagefolder")  # 12 training images
    with pytest.raises(DataProblem) as err:
        load_splits("imagefolder", {"root": str(tmp_path), "val_size": 12})
    assert str(err.value) == (
        "data.val_size=12, but the training set of 'imagefolder' holds 12 examples and at least one must remain "
        "for training. To fix: set data.val_size below 12 (0 for no validation split)."
    )


def test_unreadable_image_named_from_a_decoding_pool(tmp_path, monkeypatch):
    root = tmp_path / "imagefolder"
    _imagefolder(root, n_train=6, size=(16, 16))
    bad = root / "train" / "emu" / "3.png"
    _noise_png(bad, truncate=True)
    monkeypatch.setattr(folders, "_POOL_MIN_FILES", 1)  # a pool even for 18 files
    monkeypatch.setattr(folders, "_CHUNK", 4)  # 5 tasks over 2 worker processes
    with pytest.raises(DataProblem) as err:
        folders.decode_imagefolder(root / "train", workers=2)
    assert str(err.value).startswith(f"{bad}: not a readable image (")
    monkeypatch.setattr(folders, "_CHUNK", 1000)
    bad.unlink()
    x, y, _ = folders.decode_imagefolder(root / "train", workers=2)  # the same pool path decodes the rest
    assert torch.bincount(y).tolist() == [6, 6, 5]
