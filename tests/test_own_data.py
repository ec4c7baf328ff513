"""Your own data (dataset=folder, dataset=tensors) and torchvision's further sets
(dataset=torchvision: KMNIST, EMNIST, SVHN, CIFAR-100), each written here in its real on-disk
format and read by the real loaders: shapes and classes (config.dataset_shape without torch),
decoding, normalization, the cache, and bad input through the real CLI."""

import gzip
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_cli
from omegaconf import OmegaConf
from PIL import Image
from scipy.io import loadmat, savemat
from test_data import point_downloads_at, serve, user_cache_dir, write_idx, write_mnist  # noqa: F401 (fixtures)

import regexp.data as data
from regexp.config import ConfigError, FolderDatasetConfig, RunError, TensorsDatasetConfig, TorchvisionDatasetConfig, dataset_shape
from regexp.data import check_available, load_data
from regexp.synthetic import Python2StrPickler, write_cifar100


# ---------------------------------------------------------------- the files, in each set's real format
def write_folder(root: Path, classes=("cat", "dog", "owl"), n: int = 10, size=(12, 16), mode: str = "RGB",
                 split: str = "") -> Path:
    """`root[/split]/<class>/<i>.png`: random images of `size` (width, height), n per class."""
    rng = np.random.default_rng(len(split))
    channels = {"L": (), "RGB": (3,)}[mode]
    for name in classes:
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size[1], size[0], *channels), dtype=np.uint8)
            Image.fromarray(pixels, mode).save(folder / f"{i:03d}.png")
    return root


def write_emnist(root: Path, split: str = "balanced", n_train: int = 60, n_test: int = 20, classes: int = 47,
                 first_label: int = 0) -> Path:
    """EMNIST's files as torchvision's download leaves them: `EMNIST/raw/emnist-<split>-<train|test>-...-ubyte`."""
    raw = root / "EMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for part, n in (("train", n_train), ("test", n_test)):
        write_idx(raw / f"emnist-{split}-{part}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"emnist-{split}-{part}-labels-idx1-ubyte", np.arange(n) % classes + first_label)
    return root


def write_svhn(root: Path, n_train: int = 50, n_test: int = 20) -> Path:
    """SVHN's `train_32x32.mat` and `test_32x32.mat`: X uint8 [32, 32, 3, N], y [N, 1] in 1..10 (10: the digit 0)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for part, n in (("train", n_train), ("test", n_test)):
        savemat(root / f"{part}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                             "y": (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)})
    return root


TORCHVISION_SETS = {  # set -> (writer, (C, H, W), classes, training samples)
    "KMNIST": (lambda root: write_mnist(root, folder="KMNIST", n_train=40, n_test=20), (1, 28, 28), 10, 40),
    "EMNIST": (write_emnist, (1, 28, 28), 47, 60),
    "SVHN": (write_svhn, (3, 32, 32), 10, 50),
    "CIFAR100": (write_cifar100, (3, 32, 32), 100, 200),
}


def tv_cfg(set_name: str, root: Path, split: str = "balanced", val_size: int = 10, cache: str = "user"):
    return OmegaConf.structured(TorchvisionDatasetConfig(name="torchvision", set=set_name, split=split, root=str(root),
                                                         download=False, val_size=val_size, cache=cache))


def folder_cfg(path: Path, val_size: int = 4, **kw):
    return OmegaConf.structured(FolderDatasetConfig(name="folder", path=str(path), val_size=val_size, **kw))


def tensors_cfg(path: Path, val_size: int = 4, **kw):
    return OmegaConf.structured(TensorsDatasetConfig(name="tensors", path=str(path), val_size=val_size, **kw))


def forbid_decoding(monkeypatch):
    def decode(*args):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(data, "_decode", decode)


# ---------------------------------------------------------------- shapes and classes, without torch
def test_dataset_shape_of_every_set_needs_no_torch(tmp_path):
    """The pre-flight sizes models from dataset_shape: the sets known by name answer from a
    table, a folder from one image's header, a .npz from x's header (and its labels)."""
    write_folder(tmp_path / "pics", size=(20, 10), mode="L")
    np.savez(tmp_path / "arrays.npz", x=np.zeros((6, 3, 8, 9), np.uint8), y=np.array([0, 1, 4, 3, 1, 2]))
    code = f"""
import sys
from omegaconf import OmegaConf
from regexp.config import dataset_shape
cases = [dict(name="torchvision", set="EMNIST", split="letters"), dict(name="torchvision", set="CIFAR100", split="balanced"),
         dict(name="mnist"), dict(name="folder", path={str(tmp_path / 'pics')!r}, test_size=0.2),
         dict(name="tensors", path={str(tmp_path / 'arrays.npz')!r}, classes=None)]
print([dataset_shape(OmegaConf.create(c)) for c in cases])
assert "torch" not in sys.modules, "torch imported"
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("[((1, 28, 28), 26), ((3, 32, 32), 100), ((1, 28, 28), 10), "
                                  "((1, 10, 20), 3), ((3, 8, 9), 5)]")


def test_dataset_shape_of_a_pt_file_and_the_classes_field(tmp_path):
    torch.save({"x": torch.zeros(4, 7, 5), "y": torch.tensor([0, 1, 0, 1])}, tmp_path / "t.pt")
    assert dataset_shape(tensors_cfg(tmp_path / "t.pt")) == ((1, 7, 5), 2)
    assert dataset_shape(tensors_cfg(tmp_path / "t.pt", classes=10)) == ((1, 7, 5), 10)


# ---------------------------------------------------------------- torchvision's further sets
@pytest.mark.parametrize("set_name", list(TORCHVISION_SETS))
def test_a_torchvision_set_is_read_by_torchvision_and_cached(set_name, tmp_path, monkeypatch):
    write, shape, classes, n_train = TORCHVISION_SETS[set_name]
    root = write(tmp_path / "data")
    cfg = tv_cfg(set_name, root, val_size=10)
    assert dataset_shape(cfg) == (shape, classes)
    check_available(cfg)
    first = load_data(cfg, "cpu")
    assert (first.input_shape, first.num_classes) == (shape, classes)
    assert (len(first.train_y), len(first.val_y)) == (n_train - 10, 10)
    assert 0 <= int(first.train_y.min()) and int(first.train_y.max()) < classes
    # normalized with the training split's own mean and std (no published constants used)
    everything = torch.cat([first.train_x, first.val_x])
    assert everything.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (everything.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2
    forbid_decoding(monkeypatch)
    second = load_data(cfg, "cpu")
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_y, second.test_y)


def test_svhn_labels_10_are_the_digit_0_and_images_keep_their_channels(tmp_path):
    root = write_svhn(tmp_path / "data", n_train=20, n_test=10)
    raw = data._read_with_torchvision(data.Source("svhn", root, data.SPECS["svhn"]))
    mat = loadmat(root / "train_32x32.mat")
    assert raw["train_y"].tolist() == [i % 10 + 1 if i % 10 != 9 else 0 for i in range(20)]
    assert torch.equal(raw["train_x"][3], torch.from_numpy(mat["X"][..., 3].transpose(2, 0, 1).copy()))


def test_emnist_letters_count_their_26_classes_from_0(tmp_path):
    root = write_emnist(tmp_path / "data", split="letters", classes=26, first_label=1)
    splits = load_data(tv_cfg("EMNIST", root, split="letters"), "cpu")
    assert splits.num_classes == 26 and sorted(set(splits.test_y.tolist())) == list(range(20))


def test_emnist_is_downloaded_from_its_zip_of_gzips(tmp_path, serve, monkeypatch):
    """The download torchvision does for EMNIST (gzip.zip holding gzip/emnist-*.gz, unpacked
    into EMNIST/raw) goes through the pre-flight as the built-in sets' does."""
    from torchvision import datasets

    source = write_emnist(tmp_path / "made")
    site = tmp_path / "site"
    site.mkdir()
    with zipfile.ZipFile(site / "gzip.zip", "w") as archive:
        for f in sorted((source / "EMNIST" / "raw").iterdir()):
            archive.writestr(f"gzip/{f.name}.gz", gzip.compress(f.read_bytes()))
    monkeypatch.setattr(datasets.EMNIST, "url", f"{serve(site)}/gzip.zip")
    monkeypatch.setattr(datasets.EMNIST, "md5", None)
    root = tmp_path / "data"
    cfg = tv_cfg("EMNIST", root)
    cfg.download = True
    check_available(cfg)
    assert (root / "EMNIST" / "raw" / "emnist-balanced-train-images-idx3-ubyte").is_file()
    assert len(load_data(cfg, "cpu").test_y) == 20


def test_a_torchvision_set_that_cannot_be_downloaded_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from torchvision import datasets

    monkeypatch.setattr(datasets.SVHN, "split_list", {k: ["http://127.0.0.1:9/x.mat", f, None]
                                                      for k, (_, f, _) in datasets.SVHN.split_list.items()})
    cfg = tv_cfg("SVHN", tmp_path / "data")
    cfg.download = True
    with pytest.raises(ConfigError, match=r"^dataset.root=.*: no svhn files found at .*train_32x32.mat\) and the download failed"):
        check_available(cfg)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("set_name, broken, what", [
    ("KMNIST", "KMNIST/raw/train-labels-idx1-ubyte", "label 10 outside the 10 classes (0..9)"),
    ("SVHN", "train_32x32.mat", "label 11 outside SVHN's 1..10"),
    ("CIFAR100", "cifar-100-python/train", "label 100 outside the 100 classes (0..99)"),
])
def test_a_torchvision_file_with_labels_out_of_range_is_refused(set_name, broken, what, tmp_path):
    root = TORCHVISION_SETS[set_name][0](tmp_path / "data")
    path = root / broken
    if set_name == "KMNIST":
        write_idx(path, np.arange(40) % 11)
    elif set_name == "SVHN":
        savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1], [11]], np.uint8)})
    else:
        entry = data._load_cifar(path)
        entry["fine_labels"][5] = 100
        with open(path, "wb") as fh:
            Python2StrPickler(fh, protocol=2).dump(entry)
    with pytest.raises(RunError, match=re.escape(f"{path}: {what}")):
        check_available(tv_cfg(set_name, root))


# ---------------------------------------------------------------- a folder of images
def test_a_folder_holds_out_a_fixed_test_fraction_and_is_cached(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "pics", n=10, size=(12, 16))
    cfg = folder_cfg(root, val_size=4, test_size=0.2)
    assert dataset_shape(cfg) == ((3, 16, 12), 3)
    check_available(cfg)
    first = load_data(cfg, "cpu")
    assert (first.input_shape, first.num_classes) == ((3, 16, 12), 3)
    assert (len(first.train_y), len(first.val_y), len(first.test_y)) == (20, 4, 6)
    assert sorted(set(first.test_y.tolist())) <= [0, 1, 2]
    again = load_data(cfg, "cpu")  # the same samples held out every time
    assert torch.equal(first.test_x, again.test_x)
    forbid_decoding(monkeypatch)
    cached = load_data(cfg, "cpu")
    assert torch.equal(first.train_x, cached.train_x) and torch.equal(first.test_y, cached.test_y)


def test_a_folder_with_train_and_test_uses_them_and_labels_follow_sorted_folder_names(tmp_path):
    root = write_folder(tmp_path / "pics", classes=("b", "a"), n=6, mode="L", split="train")
    write_folder(root, classes=("a", "b"), n=3, mode="L", split="test")
    splits = load_data(folder_cfg(root, val_size=2, cache="off"), "cpu")
    assert splits.input_shape == (1, 16, 12) and len(splits.test_y) == 6
    assert splits.test_y.tolist() == [0, 0, 0, 1, 1, 1]  # a, then b
    first_a = np.asarray(Image.open(root / "test" / "a" / "000.png"), dtype=np.float32) / 255
    stats = data.channel_stats(torch.from_numpy(data.datafiles.decode_images(
        root, [f for f, _ in data.datafiles.folder_layout(folder_cfg(root)).train], (1, 16, 12))))
    expected = (torch.from_numpy(first_a) - stats[0].float()) / stats[1].float()
    assert torch.allclose(splits.test_x[0, 0], expected, atol=1e-5)


def test_normalize_false_keeps_the_pixels_as_stored(tmp_path):
    root = write_folder(tmp_path / "pics", n=5)
    splits = load_data(folder_cfg(root, val_size=0, normalize=False, cache="off"), "cpu")
    assert 0 <= splits.train_x.min() and splits.train_x.max() <= 1 and splits.train_x.max() > 0.9


# ---------------------------------------------------------------- arrays in a file
@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_tensors_files_with_and_without_a_test_split(tmp_path, suffix):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (50, 9, 7), dtype=np.uint8), np.arange(50) % 3
    x_test, y_test = rng.integers(0, 256, (10, 9, 7), dtype=np.uint8), np.arange(10) % 3
    with_test, without = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
    if suffix == ".npz":
        np.savez(with_test, x=x, y=y, x_test=x_test, y_test=y_test)
        np.savez(without, x=x, y=y)
    else:
        torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y), "x_test": torch.from_numpy(x_test),
                    "y_test": torch.from_numpy(y_test)}, with_test)
        torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, without)
    splits = load_data(tensors_cfg(with_test, val_size=5), "cpu")
    assert (splits.input_shape, splits.num_classes, len(splits.train_y), len(splits.test_y)) == ((1, 9, 7), 3, 45, 10)
    assert torch.equal(splits.test_y, torch.from_numpy(y_test))
    everything = torch.cat([splits.train_x, splits.val_x])
    assert abs(everything.mean()) < 1e-4 and abs(everything.std() - 1) < 1e-2
    held = load_data(tensors_cfg(without, val_size=5, test_size=0.2), "cpu")
    assert (len(held.train_y), len(held.val_y), len(held.test_y)) == (35, 5, 10)


def test_float_tensors_are_used_as_stored_with_normalize_false(tmp_path):
    x = np.random.default_rng(0).normal(3, 2, (20, 2, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "f.npz", x=x, y=np.arange(20) % 2, x_test=x[:4], y_test=np.array([0, 1, 0, 1]))
    splits = load_data(tensors_cfg(tmp_path / "f.npz", val_size=0, normalize=False), "cpu")
    assert torch.equal(splits.test_x, torch.from_numpy(x[:4]))


# ---------------------------------------------------------------- bad input, through the real CLI
QUICK = ["epochs=1", "logger=none", "dataset.val_size=2"]


def refused(args: list[str], cwd: Path) -> tuple[int, str]:
    """(exit code, stderr) of `regexp train` that must write nothing in `cwd` (the data aside)."""
    before = sorted(cwd.rglob("*"))
    out = run_cli(["train", *args, *QUICK], cwd)
    assert sorted(cwd.rglob("*")) == before, "something was written"
    assert out.stderr.count("\n") == 1, out.stderr
    return out.returncode, out.stderr.strip()


def bad_npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return path.name


def write_test_classes_beyond_y(path: Path) -> Path:
    """y has the classes 0..3, the test split 10..13: classes 4..9 have no sample at all."""
    np.savez(path, x=np.zeros((20, 4, 4), np.uint8), y=np.arange(20) % 4,
             x_test=np.zeros((4, 4, 4), np.uint8), y_test=np.arange(4) + 10)
    return path


BAD_FOLDERS = {
    "missing": (lambda cwd: "nowhere", 2, r"dataset.path=nowhere: no folder at .*/nowhere; give a folder"),
    "no images": (lambda cwd: (cwd / "empty" / "cat").mkdir(parents=True) or "empty", 2,
                  r"dataset.path=empty: no images \(.png.*\) in class folders under .*/empty"),
    "one class": (lambda cwd: write_folder(cwd / "one", classes=("cat",)) and "one", 2,
                  r"dataset.path=one: only one class \(cat\) has images under .*; a classifier needs at least two"),
    "mixed sizes": (lambda cwd: write_folder(cwd / "mixed") and write_folder(cwd / "mixed", classes=("owl",), n=1, size=(8, 8))
                    and "mixed", 1, r".*/mixed/owl/000.png: a 8x8 RGB image where cat/000.png is 12x16 RGB; all images"),
    "mixed modes": (lambda cwd: write_folder(cwd / "modes") and write_folder(cwd / "modes", classes=("dog",), n=1, mode="L")
                    and "modes", 1, r".*/modes/dog/000.png: a 12x16 greyscale image where cat/000.png is 12x16 RGB"),
    "an empty class folder": (lambda cwd: write_folder(cwd / "gap", classes=("a", "b")) and (cwd / "gap" / "c").mkdir()
                              or "gap", 2, r"dataset.path=gap: the class folder c under .*/gap holds no images"),
    "an empty train class": (lambda cwd: write_folder(cwd / "tt", classes=("a", "b", "c"), n=2, split="test")
                             and write_folder(cwd / "tt", classes=("a", "b", "c"), n=0, split="train")
                             and write_folder(cwd / "tt", classes=("a", "c"), split="train") and "tt", 2,
                             r"dataset.path=tt: the class folder b under .*/tt/train holds no images"),
    "train without test": (lambda cwd: write_folder(cwd / "half", split="train") and "half", 2,
                           r"dataset.path=half: .*/half has train/ but not test/"),
    "not an image": (lambda cwd: write_folder(cwd / "junk") and (cwd / "junk" / "dog" / "z.png").write_text("no") and "junk", 1,
                     r".*/junk/dog/z.png: not an image PIL reads"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_a_bad_folder_is_one_line(case, tmp_path):
    make, code, line = BAD_FOLDERS[case]
    path = make(tmp_path)
    rc, err = refused(["dataset=folder", f"dataset.path={path}"], tmp_path)
    assert rc == code and re.fullmatch(f"regexp: error: {line}.*", err), err


BAD_TENSORS = {
    "missing": (lambda d: "nowhere.npz", [], 2, r"dataset.path=nowhere.npz: no file at .*"),
    "not npz or pt": (lambda d: "x.csv", [], 2, r"dataset.path=x.csv: must be a .npz or .pt file holding x and y"),
    "lengths differ": (lambda d: bad_npz(d / "l.npz", x=np.zeros((5, 4, 4), np.uint8), y=np.array([0, 1, 0, 1])), [], 1,
                       r".*/l.npz: 4 labels in y for the 5 images of x"),
    "negative label": (lambda d: bad_npz(d / "n.npz", x=np.zeros((6, 4, 4), np.uint8), y=np.array([0, 1, -1, 1, 0, 1])), [], 1,
                       r".*/n.npz: y has label -1 outside the 2 classes \(0..1\)"),
    "label out of range": (lambda d: bad_npz(d / "r.npz", x=np.zeros((6, 4, 4), np.uint8), y=np.arange(6)),
                           ["dataset.classes=3"], 1, r".*/r.npz: y has label 5 outside the 3 classes \(0..2\)"),
    "one class": (lambda d: bad_npz(d / "o.npz", x=np.zeros((6, 4, 4), np.uint8), y=np.zeros(6, int)), [], 1,
                  r".*/o.npz: every label is 0: a classifier needs at least two classes"),
    "classes without a sample": (lambda d: bad_npz(d / "g.npz", x=np.zeros((200, 12, 12), np.uint8),
                                                   y=(np.arange(200) % 4) * 1000000), [], 1,
                                 r".*/g.npz: classes 1..999999, 1000001..1999999, 2000001..2999999 of 0..3000000 have no "
                                 r"sample in y; labels must be 0..K-1 with every class in y: relabel them, or set "
                                 r"dataset.classes=K when classes are missing from this file on purpose"),
    "a class without a sample": (lambda d: bad_npz(d / "c.npz", x=np.zeros((6, 4, 4), np.uint8),
                                                   y=np.array([0, 1, 4, 3, 1, 0])), [], 1,
                                 r".*/c.npz: class 2 of 0..4 has no sample in y; labels must be 0..K-1"),
    "test labels beyond y's": (lambda d: write_test_classes_beyond_y(d / "t.npz").name, [], 1,
                               r".*/t.npz: classes 4..13 of 0..13 have no sample in y"),
    "every other class": (lambda d: torch.save({"x": torch.zeros(10, 4, 4, dtype=torch.uint8),
                                                "y": torch.arange(10) * 2}, d / "e.pt") or "e.pt", [], 1,
                          r".*/e.pt: classes 1, 3, 5, ... \(9 in all\) of 0..18 have no sample in y"),
    "no y": (lambda d: bad_npz(d / "y.npz", x=np.zeros((6, 4, 4), np.uint8)), [], 1, r".*/y.npz: no array y"),
    "pickled labels": (lambda d: bad_npz(d / "p.npz", x=np.zeros((2, 4, 4), np.uint8), y=np.array([0, "a"], dtype=object)),
                       [], 1, r".*/p.npz: not a .npz file of plain arrays \(ValueError\)"),
    "bfloat16": (lambda d: torch.save({"x": torch.zeros(4, 3, 3, dtype=torch.bfloat16), "y": torch.arange(4) % 2},
                                      d / "b.pt") or "b.pt", [], 1, r".*/b.pt: a tensor numpy cannot hold"),
    "2-d images": (lambda d: bad_npz(d / "d.npz", x=np.zeros((6, 16), np.uint8), y=np.arange(6) % 2), [], 1,
                   r".*/d.npz: x is \[6, 16\]; give images as \[N, C, H, W\] or \[N, H, W\]"),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_a_bad_tensors_file_is_one_line(case, tmp_path):
    make, extra, code, line = BAD_TENSORS[case]
    path = make(tmp_path)
    rc, err = refused(["dataset=tensors", f"dataset.path={path}", *extra], tmp_path)
    assert rc == code and re.fullmatch(f"regexp: error: {line}.*", err), err


def test_classes_missing_from_y_on_purpose_are_kept_with_dataset_classes(tmp_path):
    cfg = tensors_cfg(write_test_classes_beyond_y(tmp_path / "t.npz"), classes=14)
    assert dataset_shape(cfg) == ((1, 4, 4), 14)
    assert load_data(cfg, "cpu").num_classes == 14


@pytest.mark.parametrize("args, line", [
    (["dataset.set=MNIST"], "dataset.set=MNIST: must be one of KMNIST, EMNIST, SVHN, CIFAR100"),
    (["dataset.set=EMNIST", "dataset.split=greek"],
     "dataset.split=greek: must be one of byclass, bymerge, balanced, letters, digits, mnist"),
    ([], "dataset.set=???: must be set: one of KMNIST, EMNIST, SVHN, CIFAR100"),
])
def test_a_bad_torchvision_choice_is_one_line(args, line, tmp_path):
    rc, err = refused(["dataset=torchvision", *args], tmp_path)
    assert (rc, err) == (2, f"regexp: error: {line}")


def test_a_missing_torchvision_set_names_its_files(tmp_path):
    rc, err = refused(["dataset=torchvision", "dataset.set=KMNIST", "dataset.download=false", "dataset.root=data"], tmp_path)
    assert rc == 2 and f"no kmnist files found at {tmp_path}/data (expected e.g. {tmp_path}/data/KMNIST/raw/" in err


# ---------------------------------------------------------------- end to end
def trained(args: list[str], cwd: Path) -> dict:
    out = run_cli(["train", "epochs=1", "logger=none", "batch_size=16", "eval_batch_size=64", *args], cwd)
    assert out.returncode == 0, out.stderr[-2000:]
    [summary] = cwd.glob("outputs/*/*/summary.json")
    return json.loads(summary.read_text())


@pytest.mark.slow
def test_a_folder_trains_end_to_end(tmp_path):
    write_folder(tmp_path / "pics", n=12, size=(10, 14), mode="L")
    summary = trained(["dataset=folder", "dataset.path=pics", "dataset.val_size=4", "dataset.limit=20"], tmp_path)
    assert summary["status"] == "completed" and summary["data"] == {"input_shape": [1, 14, 10], "classes": 3}
    assert summary["train_samples"] == 20 and "test/acc" in summary["metrics"]


@pytest.mark.slow
def test_a_tensors_file_trains_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "arrays.npz", x=rng.integers(0, 256, (80, 3, 6, 6), dtype=np.uint8), y=np.arange(80) % 5)
    summary = trained(["dataset=tensors", "dataset.path=arrays.npz", "dataset.val_size=8", "model=cnn",
                       "model.channels=[4]", "model.fc=8"], tmp_path)
    assert summary["status"] == "completed" and summary["data"] == {"input_shape": [3, 6, 6], "classes": 5}
    assert summary["train_samples"] == 80 - 16 - 8  # the held-out test fifth, then validation


@pytest.mark.slow
def test_a_tensors_file_with_classes_missing_on_purpose_trains_with_dataset_classes(tmp_path):
    write_test_classes_beyond_y(tmp_path / "t.npz")
    summary = trained(["dataset=tensors", "dataset.path=t.npz", "dataset.classes=14", "dataset.val_size=2"], tmp_path)
    assert summary["status"] == "completed" and summary["data"] == {"input_shape": [1, 4, 4], "classes": 14}


@pytest.mark.slow
@pytest.mark.parametrize("set_name", list(TORCHVISION_SETS))
def test_a_torchvision_set_trains_end_to_end(set_name, tmp_path):
    write, shape, classes, _ = TORCHVISION_SETS[set_name]
    write(tmp_path / "data")
    summary = trained(["dataset=torchvision", f"dataset.set={set_name}", "dataset.root=data", "dataset.download=false",
                       "dataset.val_size=10", "dataset.limit=30"], tmp_path)
    assert summary["status"] == "completed" and summary["data"] == {"input_shape": list(shape), "classes": classes}


def test_a_cached_mean_and_std_that_cannot_normalize_do_not_fit(tmp_path, capsys):
    root = write_folder(tmp_path / "pics", n=5)
    cfg = folder_cfg(root, val_size=2)
    load_data(cfg, "cpu")
    [path] = data._cache_files("folder", root, "user")
    entry = torch.load(path, weights_only=True)
    entry["std"] = torch.zeros(3, dtype=torch.float64)
    torch.save(entry, path)
    check_available(cfg)
    assert capsys.readouterr().err == (f"regexp: the decoded-data cache {path} does not fit the raw files "
                                       "(its std is [0.0, 0.0, 0.0]: not a usable per-channel std); decoding them again\n")
    assert (load_data(cfg, "cpu").train_x.std(dim=(0, 2, 3)) > 0.5).all()
