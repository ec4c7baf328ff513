import gzip
import http.server
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SHARED_DATA, TINY, compose_train, require_shared_data, run_cli
from omegaconf import OmegaConf
from torch.overrides import TorchFunctionMode

import regexp.data as data
from regexp.config import ConfigError, DatasetConfig, RunError
from regexp.data import augment_batch, check_available, dataset_root, load_data
from regexp.synthetic import write_cifar10

REAL_DATA = SHARED_DATA
REAL_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def ds_cfg(name: str, root: Path, val_size: int = 0, limit=None, download: bool = False, cache: str = "user"):
    return OmegaConf.structured(DatasetConfig(name=name, root=str(root), download=download, val_size=val_size,
                                              limit=limit, cache=cache))


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


def write_idx(path: Path, array: np.ndarray, magic: bytes = b"\x00\x00\x08") -> None:
    """An idx file: magic (two zero bytes, element type 0x08 = ubyte), ndim, big-endian sizes, the bytes."""
    header = magic + bytes([array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 30, n_test: int = 10) -> Path:
    """A small MNIST-format data set (random images, labels 0..9 cycling) under `root/folder/raw`."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    return root


@pytest.fixture
def mnist_root(tmp_path) -> Path:
    return write_mnist(tmp_path / "data")


def closed_port() -> int:
    """A local port nobody listens on: connecting is refused at once, as without a network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def point_downloads_at(monkeypatch, base: str) -> None:
    """Every data set's download URLs at `base` (the tests never reach the internet), and no
    checksums: the files a test serves are not the real archives."""
    from torchvision import datasets

    for cls in (datasets.MNIST, datasets.FashionMNIST):
        monkeypatch.setattr(cls, "mirrors", [f"{base}/", f"{base}/second-mirror/"])
        monkeypatch.setattr(cls, "resources", [(f, None) for f, _ in cls.resources])
    monkeypatch.setattr(datasets.CIFAR10, "url", f"{base}/cifar-10-python.tar.gz")
    monkeypatch.setattr(datasets.CIFAR10, "tgz_md5", None)


@pytest.fixture
def serve(tmp_path):
    """serve(folder) -> the base URL of a local HTTP server of `folder` (404 for what it lacks)."""
    servers = []

    def start(folder: Path) -> str:
        handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *args: None
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def mirror_of(root: Path, name: str, into: Path) -> Path:
    """`into` holding what the real mirrors serve for the data set in `root`: gzipped idx
    files, or CIFAR-10's tar.gz."""
    into.mkdir(parents=True, exist_ok=True)
    if name == "cifar10":
        with tarfile.open(into / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        return into
    for f in data.SPECS[name].files:
        (into / f"{Path(f).name}.gz").write_bytes(gzip.compress((root / f).read_bytes()))
    return into


def row_indices(rows: torch.Tensor, reference: torch.Tensor) -> list[int]:
    """Position in `reference` of each row of `rows` (the fake images are unique)."""
    matches = (rows.flatten(1)[:, None, :] == reference.flatten(1)[None, :, :]).all(dim=2)
    assert (matches.sum(dim=1) == 1).all()
    return matches.int().argmax(dim=1).tolist()


# ---------------------------------------------------------------- module, root, availability
@pytest.mark.slow
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


def test_check_available_passes_when_the_files_exist(cifar_root):
    check_available(ds_cfg("cifar10", cifar_root))


def test_check_available_wants_every_file(cifar_root):
    (cifar_root / "cifar-10-batches-py" / "batches.meta").unlink()
    with pytest.raises(ConfigError, match="batches.meta"):
        check_available(ds_cfg("cifar10", cifar_root))


# ---------------------------------------------------------------- download
@pytest.mark.parametrize("name, source", [("mnist", "mnist"), ("fashion_mnist", "mnist"), ("cifar10", "cifar")])
def test_missing_files_are_downloaded_in_the_preflight(tmp_path, monkeypatch, serve, name, source):
    """download=true fetches them with torchvision's downloader (here from a local mirror)."""
    folder = data.SPECS[name].files[0].split("/")[0]
    made = write_mnist(tmp_path / "made", folder) if source == "mnist" else write_cifar10(tmp_path / "made")
    point_downloads_at(monkeypatch, serve(mirror_of(made, name, tmp_path / "mirror")))
    root = tmp_path / "fresh" / "data"
    check_available(ds_cfg(name, root, download=True))
    for f in data.SPECS[name].files:
        assert (root / f).read_bytes() == (made / f).read_bytes()
    check_available(ds_cfg(name, root, download=False))  # found now
    assert load_data(ds_cfg(name, root), "cpu").num_classes == 10


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_failed_download_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, name):
    point_downloads_at(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    root = tmp_path / "fresh" / "data"
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        check_available(ds_cfg(name, root, download=True))
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "\n" not in message and len(message.replace(str(root), "ROOT")) < 300
    assert f"no {name} files found at {root}" in message  # the folder searched
    assert "the download failed: [Errno 111] Connection refused;" in message  # why, in urllib's words
    assert "REGEXP_DATA_DIR" in message and "dataset.root" in message  # how to point regexp at a copy
    assert not (tmp_path / "fresh").exists()  # no empty data/MNIST/raw tree


def test_failed_download_removes_its_partial_files_only(tmp_path, monkeypatch, serve, mnist_root):
    """The first file arrives, the second does not exist on the mirror: the data set's folder
    goes, what was in the root before stays."""
    mirror = mirror_of(mnist_root, "mnist", tmp_path / "mirror")
    for f in mirror.iterdir():
        if f.name != "train-images-idx3-ubyte.gz":
            f.unlink()
    point_downloads_at(monkeypatch, serve(mirror))
    root = tmp_path / "shared"
    (root / "CIFAR").mkdir(parents=True)
    (root / "notes.txt").write_text("kept")
    with pytest.raises(ConfigError, match="the download failed: HTTP Error 404: File not found;"):
        check_available(ds_cfg("mnist", root, download=True))
    assert sorted(p.name for p in root.iterdir()) == ["CIFAR", "notes.txt"]


def test_failed_download_keeps_what_the_folder_held_before(tmp_path, monkeypatch, mnist_root):
    point_downloads_at(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    (mnist_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    before = sorted(p.relative_to(mnist_root) for p in mnist_root.rglob("*"))
    with pytest.raises(ConfigError, match="t10k-labels-idx1-ubyte"):
        check_available(ds_cfg("mnist", mnist_root, download=True))
    assert sorted(p.relative_to(mnist_root) for p in mnist_root.rglob("*")) == before


def test_a_stalled_server_fails_the_download_after_the_timeout(tmp_path, monkeypatch):
    """A server that accepts and never answers (a dead network behind a proxy or firewall)."""
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT_S", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        point_downloads_at(monkeypatch, f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        with pytest.raises(ConfigError, match="the download failed: timed out;"):
            check_available(ds_cfg("cifar10", tmp_path / "data", download=True))
    assert time.monotonic() - started < 5
    assert socket.getdefaulttimeout() is None  # the process-wide timeout is restored
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------- files that disagree (refused in the pre-flight)
def rewrite_idx(path: Path, change) -> None:
    """Rewrite an idx file's array through `change(array) -> array`."""
    raw = path.read_bytes()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    array = np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(dims)
    write_idx(path, change(array.copy()))


def set_label(array: np.ndarray) -> np.ndarray:
    array[3] = 10
    return array


IDX_CASES = {
    "wrong magic": ("train-images-idx3-ubyte", lambda p: p.write_bytes(b"\x00\x00\x08\x01" + p.read_bytes()[4:]),
                    "not an idx file of 3-dimensional bytes (magic number 0x00000801, expected 0x00000803)"),
    "label outside the classes": ("t10k-labels-idx1-ubyte", lambda p: rewrite_idx(p, set_label),
                                  "label 10 outside the 10 classes (0..9)"),
    "counts disagree": ("train-labels-idx1-ubyte", lambda p: rewrite_idx(p, lambda a: a[:-1]),
                        "29 labels for the 30 images of train-images-idx3-ubyte"),
    "wrong image size": ("t10k-images-idx3-ubyte", lambda p: rewrite_idx(p, lambda a: a[:, :27, :]),
                         "images of 27x28 pixels, not 28x28"),
    "truncated": ("train-images-idx3-ubyte", lambda p: p.write_bytes(p.read_bytes()[:1000]),
                  "1000 bytes where its header announces 23536: truncated or corrupted"),
    "header cut short": ("t10k-labels-idx1-ubyte", lambda p: p.write_bytes(p.read_bytes()[:6]),
                         "the header ends early: truncated or corrupted"),
}


@pytest.mark.parametrize("case", IDX_CASES)
def test_idx_files_that_do_not_fit_are_named(mnist_root, case):
    filename, damage, expected = IDX_CASES[case]
    path = mnist_root / "MNIST" / "raw" / filename
    damage(path)
    with pytest.raises(RunError) as caught:
        check_available(ds_cfg("mnist", mnist_root, download=True))  # present: nothing is downloaded over them
    assert str(caught.value) == f"{path}: {expected}; {data.REPLACE_IT}"


class RunsCode:
    """A pickle that would create `marker` when unpickled by a plain unpickler."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def cifar_batch(path: Path) -> dict:
    return pickle.loads(path.read_bytes(), encoding="latin1")


CIFAR_CASES = {
    "label outside the classes": (lambda b: {**b, "labels": [*b["labels"][:-1], 10]}, "label 10 outside the 10 classes"),
    "counts disagree": (lambda b: {**b, "labels": b["labels"][:-1]}, "19 labels for 20 images"),
    "wrong image size": (lambda b: {**b, "data": b["data"][:, :3000]}, "'data' must be uint8 rows of 3072 values"),
    "not a dict": (lambda b: [b], "not a CIFAR-10 batch (a list, not a dict)"),
}


@pytest.mark.parametrize("case", CIFAR_CASES)
def test_cifar_batches_that_do_not_fit_are_named(cifar_root, case):
    change, expected = CIFAR_CASES[case]
    path = cifar_root / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(pickle.dumps(change(cifar_batch(path))))
    with pytest.raises(RunError, match=re.escape(f"{path}: {expected}")):
        check_available(ds_cfg("cifar10", cifar_root))


def test_cifar_meta_must_name_the_classes(cifar_root):
    path = cifar_root / "cifar-10-batches-py" / "batches.meta"
    path.write_bytes(pickle.dumps({"label_names": ["cat", "dog"]}))
    with pytest.raises(RunError, match="batches.meta: label_names must list the 10 classes"):
        check_available(ds_cfg("cifar10", cifar_root))


def test_a_crafted_cifar_pickle_is_refused_without_running_it(cifar_root, tmp_path):
    marker = tmp_path / "ran"
    path = cifar_root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({"data": RunsCode(marker)}, protocol=2))
    with pytest.raises(RunError, match=r"test_batch: not a CIFAR-10 pickle \(UnpicklingError: it refers to posix.mkdir"):
        check_available(ds_cfg("cifar10", cifar_root))
    assert not marker.exists()


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
    cfg = ds_cfg("mnist", real_root, val_size=100, limit=1000, cache="beside_data")
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
    cfg = ds_cfg("cifar10", cifar_root, val_size=10, cache="beside_data")
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
    cfg = ds_cfg("cifar10", cifar_root, cache="beside_data")
    cifar_root.chmod(0o555)
    try:
        first = load_data(cfg, "cpu")
        assert not (cifar_root / "regexp-cache").exists()
        assert len(list(user_cache_dir.glob("cifar10-*.pt"))) == 1
        forbid_decoding(monkeypatch)
        assert torch.equal(first.train_x, load_data(cfg, "cpu").train_x)
    finally:
        cifar_root.chmod(0o755)


def test_the_cache_goes_to_the_user_directory_by_default(cifar_root, user_cache_dir, monkeypatch):
    cfg = ds_cfg("cifar10", cifar_root)
    assert cfg.cache == DatasetConfig().cache == "user"
    first = load_data(cfg, "cpu")
    assert not (cifar_root / "regexp-cache").exists()  # nothing written into the data folder
    assert len(list(user_cache_dir.glob("cifar10-*.pt"))) == 1
    forbid_decoding(monkeypatch)
    assert torch.equal(first.train_x, load_data(cfg, "cpu").train_x)


def test_roots_keep_their_own_cache_entries(tmp_path, user_cache_dir):
    for seed, name in enumerate(("a", "b")):
        write_cifar10(tmp_path / name, per_batch=4, n_test=4, seed=seed)
        load_data(ds_cfg("cifar10", tmp_path / name), "cpu")
    assert len(list(user_cache_dir.glob("cifar10-*.pt"))) == 2


def test_cache_off_writes_nothing_and_decodes_each_time(cifar_root, user_cache_dir, monkeypatch):
    cfg = ds_cfg("cifar10", cifar_root, cache="off")
    load_data(cfg, "cpu")
    assert not user_cache_dir.exists() and not (cifar_root / "regexp-cache").exists()
    forbid_decoding(monkeypatch)
    with pytest.raises(AssertionError, match="decoded again"):
        load_data(cfg, "cpu")


def test_cache_mode_is_validated():
    from regexp.config import validate

    with pytest.raises(ConfigError, match="dataset.cache=next_to_data"):
        validate(compose_train(["dataset.cache=next_to_data"]))


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"REGEXP_CACHE_DIR": "/tmp/mine", "XDG_CACHE_HOME": "/tmp/xdg"}, "/tmp/mine"),
        ({"XDG_CACHE_HOME": "/tmp/xdg"}, "/tmp/xdg/regexp"),
        ({"XDG_CACHE_HOME": "relative/xdg"}, "HOME/.cache/regexp"),  # the XDG spec ignores relative paths
        ({}, "HOME/.cache/regexp"),
    ],
)
def test_cache_directory_follows_the_environment(monkeypatch, tmp_path, env, expected):
    monkeypatch.delenv("REGEXP_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert data.cache_dir() == Path(expected.replace("HOME", str(tmp_path)))


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


# ---------------------------------------------------------------- the pre-flight through the real CLI
@pytest.fixture
def no_internet(monkeypatch):
    """For subprocesses: every HTTP(S) request goes to a proxy port that refuses (urllib honours
    these variables), so a download fails as it does offline, without touching the network."""
    proxy = f"http://127.0.0.1:{closed_port()}"
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(key, proxy)
    for key in ("no_proxy", "NO_PROXY", "REGEXP_DATA_DIR"):
        monkeypatch.delenv(key, raising=False)


@pytest.mark.slow
def test_offline_first_run_says_why_in_one_line_and_writes_nothing(tmp_path, no_internet):
    """`regexp train +regularizer=dropout` typed in an empty folder without data or network."""
    out = run_cli(["train", "+regularizer=dropout"], tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"regexp: error: dataset.root=data: no mnist files found at {tmp_path / 'data'} ")
    assert "and the download failed: [Errno 111] Connection refused; copy the data set there" in out.stderr
    assert "REGEXP_DATA_DIR" in out.stderr
    assert list(tmp_path.iterdir()) == []  # no outputs/, no empty data/MNIST/raw


@pytest.mark.slow
def test_a_data_file_that_does_not_fit_is_refused_before_any_run_dir(tmp_path, mnist_root):
    rewrite_idx(mnist_root / "MNIST" / "raw" / "train-labels-idx1-ubyte", set_label)
    cwd = tmp_path / "work"
    cwd.mkdir()
    out = run_cli(["train", "logger=none"], cwd, data_root=mnist_root)
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr == (f"regexp: error: {mnist_root}/MNIST/raw/train-labels-idx1-ubyte: "
                          f"label 10 outside the 10 classes (0..9); {data.REPLACE_IT}\n")
    assert list(cwd.iterdir()) == []


@pytest.mark.slow
def test_a_sweep_reports_the_job_whose_download_failed_and_runs_the_others(tmp_path, data_root, no_internet):
    root = tmp_path / "data"
    root.mkdir()
    (root / "MNIST").symlink_to(data_root / "MNIST")  # Fashion-MNIST is missing; the download may run, and fails
    out = run_cli(["train", "-m", "logger=none", f"hydra.sweep.dir={tmp_path}/sweep", "dataset=fashion_mnist,mnist",
                   *TINY], tmp_path, data_root=root)
    assert out.returncode == 1, out.stderr[-3000:]
    jobs = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/summary.json")}
    assert [jobs[n]["status"] for n in ("0", "1")] == ["failed", "completed"]
    line = f"dataset.root={root}: no fashion_mnist files found at {root} "
    assert jobs["0"]["error"].startswith(f"ConfigError: {line}") and "the download failed" in jobs["0"]["error"]
    assert line in out.stdout.replace("\n", "")  # the sweep summary on the console
    assert sorted(p.name for p in root.iterdir()) == ["MNIST"]  # no empty FashionMNIST/raw
