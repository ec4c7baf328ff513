import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, SHARED_DATA, require_shared_data
from omegaconf import OmegaConf
from torch.overrides import TorchFunctionMode

import regexp.data as data
from regexp.config import ConfigError, DatasetConfig, RunError
from regexp.data import augment_batch, check_available, dataset_root, load_data
from regexp.synthetic import write_cifar10

REAL_DATA = SHARED_DATA
REAL_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def ds_cfg(name: str, root: Path, val_size: int = 0, limit=None, download: bool = False):
    return OmegaConf.structured(DatasetConfig(name=name, root=str(root), download=download, val_size=val_size, limit=limit))


@pytest.fixture(autouse=True)
def user_cache_dir(tmp_path, monkeypatch) -> Path:
    """Keeps the per-user cache fallback out of ~/.cache."""
    path = tmp_path / "user-cache"
    monkeypatch.setenv("REGEXP_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def real_root(tmp_path_factory) -> Path:
    """A root linking to the real data sets, so their cache is written here and never next to the shared data."""
    root = tmp_path_factory.mktemp("real-data")
    for folder in REAL_FOLDERS.values():
        if (REAL_DATA / folder).is_dir():
            (root / folder).symlink_to((REAL_DATA / folder).resolve())
    return root


@pytest.fixture
def cifar_root(tmp_path) -> Path:
    return write_cifar10(tmp_path / "data", per_batch=20, n_test=20)  # 100 training images


def row_indices(rows: torch.Tensor, reference: torch.Tensor) -> list[int]:
    """Position in `reference` of each row of `rows` (the fake images are unique)."""
    matches = (rows.flatten(1)[:, None, :] == reference.flatten(1)[None, :, :]).all(dim=2)
    assert (matches.sum(dim=1) == 1).all()
    return matches.int().argmax(dim=1).tolist()


# ---------------------------------------------------------------- module, root, availability
def test_import_does_not_load_torchvision():
    code = "import sys, regexp.data; assert 'torchvision' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)


def test_dataset_root_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert dataset_root(ds_cfg("mnist", Path("data"))) == tmp_path / "data"
    assert dataset_root(ds_cfg("mnist", Path("/abs/data"))) == Path("/abs/data")


@pytest.mark.parametrize(
    "name, expected_file",
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
        ("fashion_mnist", "FashionMNIST/raw/train-images-idx3-ubyte"),
        ("cifar10", "cifar-10-batches-py/data_batch_1"),
    ],
)
def test_check_available_names_the_missing_files(tmp_path, name, expected_file):
    with pytest.raises(ConfigError) as caught:
        check_available(ds_cfg(name, tmp_path))
    err = caught.value
    assert err.key == "dataset.root" and err.value == str(tmp_path)
    assert f"no {name} files found at {tmp_path}" in err.allowed
    assert str(tmp_path / expected_file) in err.allowed
    assert "dataset.download=false" in err.allowed and "REGEXP_DATA_DIR" in err.allowed
    check_available(ds_cfg(name, tmp_path, download=True))  # torchvision will fetch them


def test_check_available_passes_when_the_files_exist(cifar_root):
    check_available(ds_cfg("cifar10", cifar_root))


def test_check_available_wants_every_file(cifar_root):
    (cifar_root / "cifar-10-batches-py" / "batches.meta").unlink()
    with pytest.raises(ConfigError, match="batches.meta"):
        check_available(ds_cfg("cifar10", cifar_root))


# ---------------------------------------------------------------- real MNIST / Fashion-MNIST
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_real_data_shapes_dtypes_and_normalization(real_root, name):
    require_shared_data(REAL_FOLDERS[name])
    splits = load_data(ds_cfg(name, real_root, val_size=5000, limit=20000), "cpu")
    assert splits.train_x.shape == (20000, 1, 28, 28) and splits.val_x.shape == (5000, 1, 28, 28)
    assert splits.test_x.shape == (10000, 1, 28, 28)
    assert splits.train_y.shape == (20000,) and splits.val_y.shape == (5000,) and splits.test_y.shape == (10000,)
    assert splits.num_classes == 10 and splits.input_shape == (1, 28, 28)
    for x, y in [(splits.train_x, splits.train_y), (splits.val_x, splits.val_y), (splits.test_x, splits.test_y)]:
        assert x.dtype == torch.float32 and x.is_contiguous() and x.device.type == "cpu"
        assert y.dtype == torch.int64 and set(y.unique().tolist()) == set(range(10))
    # the constants are the full training set's statistics; 20000 samples land close
    assert abs(splits.train_x.mean().item()) < 0.02
    assert abs(splits.train_x.std().item() - 1) < 0.02


def test_real_data_is_cached_and_reloads_equal(real_root):
    require_shared_data("MNIST")
    cfg = ds_cfg("mnist", real_root, val_size=100, limit=1000)
    first = load_data(cfg, "cpu")
    assert (real_root / "regexp-cache" / "mnist.pt").is_file()
    second = load_data(cfg, "cpu")
    assert all(torch.equal(getattr(first, k), getattr(second, k)) for k in ("train_x", "val_x", "test_x", "train_y", "val_y", "test_y"))


# ---------------------------------------------------------------- CIFAR-10 and the splits
def test_cifar_files_are_in_the_real_format(cifar_root):
    folder = cifar_root / "cifar-10-batches-py"
    as_bytes = pickle.loads((folder / "data_batch_1").read_bytes(), encoding="bytes")
    assert set(as_bytes) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert as_bytes[b"data"].dtype.name == "uint8" and as_bytes[b"data"].shape == (20, 3072)
    assert as_bytes[b"labels"] == [i % 10 for i in range(20)]
    as_latin1 = pickle.loads((folder / "test_batch").read_bytes(), encoding="latin1")  # how torchvision reads it
    assert set(as_latin1) == {"batch_label", "labels", "data", "filenames"}
    meta = pickle.loads((folder / "batches.meta").read_bytes(), encoding="bytes")
    assert meta[b"label_names"][0] == b"airplane" and meta[b"num_vis"] == 3072


def test_cifar10_loads_channel_major_images(cifar_root):
    splits = load_data(ds_cfg("cifar10", cifar_root, val_size=10), "cpu")
    assert splits.train_x.shape == (90, 3, 32, 32) and splits.val_x.shape == (10, 3, 32, 32)
    assert splits.test_x.shape == (20, 3, 32, 32) and splits.input_shape == (3, 32, 32)
    assert splits.test_y.tolist() == [i % 10 for i in range(20)]
    raw = pickle.loads((cifar_root / "cifar-10-batches-py" / "test_batch").read_bytes(), encoding="bytes")[b"data"]
    mean = torch.tensor(data.SPECS["cifar10"].mean).view(1, 3, 1, 1)
    std = torch.tensor(data.SPECS["cifar10"].std).view(1, 3, 1, 1)
    decoded = torch.round((splits.test_x * std + mean) * 255)
    assert torch.equal(decoded, torch.from_numpy(raw).view(20, 3, 32, 32).float())


def test_val_split_is_disjoint_in_original_order_and_fixed(cifar_root):
    everything = load_data(ds_cfg("cifar10", cifar_root), "cpu").train_x
    torch.manual_seed(1)  # the run seed must not move the validation set
    first = load_data(ds_cfg("cifar10", cifar_root, val_size=30), "cpu")
    torch.manual_seed(2)
    second = load_data(ds_cfg("cifar10", cifar_root, val_size=30), "cpu")
    assert torch.equal(first.val_x, second.val_x) and torch.equal(first.train_x, second.train_x)
    train_rows, val_rows = row_indices(first.train_x, everything), row_indices(first.val_x, everything)
    assert train_rows == sorted(train_rows)
    assert sorted(train_rows + val_rows) == list(range(100))


def test_limit_keeps_the_first_training_samples(cifar_root):
    full = load_data(ds_cfg("cifar10", cifar_root, val_size=30), "cpu")
    limited = load_data(ds_cfg("cifar10", cifar_root, val_size=30, limit=25), "cpu")
    assert torch.equal(limited.train_x, full.train_x[:25]) and torch.equal(limited.train_y, full.train_y[:25])
    assert torch.equal(limited.val_x, full.val_x) and torch.equal(limited.test_x, full.test_x)


def test_val_size_zero_gives_empty_validation(cifar_root):
    splits = load_data(ds_cfg("cifar10", cifar_root, val_size=0), "cpu")
    assert splits.train_x.shape[0] == 100
    assert splits.val_x.shape == (0, 3, 32, 32) and splits.val_y.shape == (0,)


def test_val_size_must_leave_training_samples(cifar_root):
    with pytest.raises(ConfigError) as caught:
        load_data(ds_cfg("cifar10", cifar_root, val_size=100), "cpu")
    assert caught.value.key == "dataset.val_size" and "100 training samples" in caught.value.allowed


def test_corrupt_pickle_is_named(cifar_root):
    (cifar_root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(RunError, match="data_batch_3: cannot read cifar10 .* truncated or corrupted"):
        load_data(ds_cfg("cifar10", cifar_root), "cpu")


def test_truncated_idx_file_is_named(tmp_path, real_root):
    require_shared_data("MNIST")
    root = tmp_path / "data"
    (root / "MNIST" / "raw").mkdir(parents=True)
    for f in (real_root / "MNIST" / "raw").iterdir():
        (root / "MNIST" / "raw" / f.name).write_bytes(f.read_bytes())
    with open(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", "r+b") as fh:
        fh.truncate(5000)
    with pytest.raises(RunError, match="t10k-labels-idx1-ubyte: cannot read mnist"):
        load_data(ds_cfg("mnist", root), "cpu")


# ---------------------------------------------------------------- cache
def forbid_decoding(monkeypatch):
    def decode(*args):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(data, "_read_with_torchvision", decode)


def test_second_load_reads_the_cache(cifar_root, monkeypatch):
    cfg = ds_cfg("cifar10", cifar_root, val_size=10)
    first = load_data(cfg, "cpu")
    assert (cifar_root / "regexp-cache" / "cifar10.pt").is_file()
    forbid_decoding(monkeypatch)
    second = load_data(cfg, "cpu")
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_y, second.test_y)


def test_cache_is_invalidated_when_the_files_change(cifar_root):
    cfg = ds_cfg("cifar10", cifar_root)
    before = load_data(cfg, "cpu").train_x
    write_cifar10(cifar_root, seed=1)
    for path in (cifar_root / "cifar-10-batches-py").iterdir():  # a coarse-clock file system may keep the mtime
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    after = load_data(cfg, "cpu").train_x
    assert not torch.equal(before, after)
    assert torch.equal(after, load_data(cfg, "cpu").train_x)


def test_read_only_root_caches_in_the_user_directory(cifar_root, user_cache_dir, monkeypatch):
    cfg = ds_cfg("cifar10", cifar_root)
    cifar_root.chmod(0o555)
    try:
        first = load_data(cfg, "cpu")
        assert not (cifar_root / "regexp-cache").exists()
        assert len(list(user_cache_dir.glob("cifar10-*.pt"))) == 1
        forbid_decoding(monkeypatch)
        assert torch.equal(first.train_x, load_data(cfg, "cpu").train_x)
    finally:
        cifar_root.chmod(0o755)


# ---------------------------------------------------------------- augmentation
def test_augment_keeps_shape_and_is_identity_when_off():
    x = torch.randn(8, 3, 32, 32)
    assert augment_batch(x, crop=0, flip=False) is x
    assert augment_batch(x, crop=4, flip=True).shape == x.shape


def test_flip_mirrors_some_samples_and_follows_the_global_seed():
    x = torch.randn(64, 3, 8, 8)
    torch.manual_seed(0)
    out = augment_batch(x, crop=0, flip=True)
    flipped = (out == x.flip(3)).flatten(1).all(dim=1)
    kept = (out == x).flatten(1).all(dim=1)
    assert (flipped | kept).all() and 0 < flipped.sum() < 64
    torch.manual_seed(0)
    assert torch.equal(out, augment_batch(x, crop=0, flip=True))


def test_crop_moves_a_lit_pixel_by_at_most_crop():
    crop, n = 3, 256
    x = torch.zeros(n, 1, 16, 16)
    x[:, :, 8, 8] = 1
    out = augment_batch(x, crop=crop, flip=False)
    assert (out.sum(dim=(1, 2, 3)) == 1).all()  # the pixel stays inside: it sits more than `crop` from the edges
    lit = out.flatten(1).argmax(dim=1)
    shift_y, shift_x = lit // 16 - 8, lit % 16 - 8
    assert shift_y.abs().max() == crop and shift_x.abs().max() == crop
    assert len(set(zip(shift_y.tolist(), shift_x.tolist()))) > (2 * crop + 1) ** 2 // 2


def test_crop_brings_in_zero_padding_only_at_the_border():
    crop = 2
    out = augment_batch(torch.ones(128, 3, 10, 10), crop=crop, flip=True)
    assert ((out == 0) | (out == 1)).all()
    assert (out == 0).any()
    inner = out[:, :, crop:-crop, crop:-crop]
    assert (inner == 1).all()


def test_augment_processes_the_batch_at_once():
    class CountCalls(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            CountCalls.calls += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for n in (2, 200):
        CountCalls.calls = 0
        with CountCalls():
            augment_batch(torch.randn(n, 3, 32, 32), crop=4, flip=True)
        counts.append(CountCalls.calls)
    assert counts[0] == counts[1]
