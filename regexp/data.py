"""Data sets as tensors on the training device, and batched augmentation (docs/data.md).

Images are decoded once (torchvision's readers, or PIL for a folder of images), normalized
once with the data set's per-channel constants (or its training split's mean and std) and
moved to the device once; the trainer then slices batches out of them. The raw uint8 tensors
are cached (in the user's cache directory unless `dataset.cache` says otherwise) so a second
run skips decoding entirely; arrays from a .npz/.pt file (dataset=tensors) are read as they are.
Importing this module must stay light: torchvision is imported only to download or decode.

`check_available` is the pre-flight: it finds the files, downloads them when they are
missing (and `dataset.download` allows it), checks that they agree with each other, and
checks the cache against them (a line when it does not fit: it will be decoded again),
before any run dir exists. What it refuses is one line: missing data a ConfigError (exit 2), a file
that does not fit a RunError (exit 1).
"""

import functools
import hashlib
import os
import pickle
import re
import socket
import sys
import tempfile
import warnings
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, BinaryIO, Optional

import numpy as np
import torch
import torch.nn.functional as F

from regexp import datafiles
from regexp.config import BUILTIN_SETS, EMNIST_SPLITS, TORCHVISION_SETS, ConfigError, RunError
from regexp.rundir import NotARegularFile, missing_dirs, open_regular, remove_empty_dirs

CACHE_VERSION = 2  # bump when the cached entry's layout changes (2: written only after the files were checked)
CACHE_MODES = ("user", "beside_data", "off")  # dataset.cache
# A stalled connection fails a download attempt after this long (per mirror); a refused or unresolvable one fails at once.
DOWNLOAD_TIMEOUT_S = 10


@dataclass
class DataSplits:
    train_x: torch.Tensor  # float32 [N, C, H, W], normalized, on the device
    train_y: torch.Tensor  # int64 [N]
    val_x: torch.Tensor  # 0 rows when val_size == 0
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)


@dataclass(frozen=True)
class DatasetSpec:
    torchvision_class: str  # name in torchvision.datasets ("" for a folder of images)
    files: tuple[str, ...]  # relative to the root: what must exist, and what the cache fingerprints
    downloads: tuple[str, ...]  # relative to the root: what torchvision's download creates (removed when it fails)
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    mean: Optional[tuple[float, ...]] = None  # per channel, of the training set in [0, 1]; None: computed
    std: Optional[tuple[float, ...]] = None  # from the training split and cached with the images
    layout: str = "idx"  # the files' format: idx, cifar10, cifar100, svhn, folder
    options: tuple[tuple[str, str], ...] = ()  # the torchvision class's arguments besides train (EMNIST's split)
    label_offset: int = 0  # the files' first label (EMNIST letters count from 1)
    folder: Optional[datafiles.FolderLayout] = None  # a folder of images: its files per split


def _idx_files(folder: str, prefix: str = "", splits: tuple[str, str] = ("train", "t10k")) -> tuple[str, ...]:
    return tuple(
        f"{folder}/raw/{prefix}{split}-{kind}-ubyte"
        for split in splits
        for kind in ("images-idx3", "labels-idx1")
    )


CIFAR10_FILES = tuple(
    f"cifar-10-batches-py/{name}"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
)

SPECS = {  # the built-in sets (published constants), then torchvision's further sets (dataset=torchvision)
    "mnist": DatasetSpec("MNIST", _idx_files("MNIST"), ("MNIST",), *BUILTIN_SETS["mnist"], (0.1307,), (0.3081,)),
    "fashion_mnist": DatasetSpec("FashionMNIST", _idx_files("FashionMNIST"), ("FashionMNIST",),
                                 *BUILTIN_SETS["fashion_mnist"], (0.2860,), (0.3530,)),
    "cifar10": DatasetSpec("CIFAR10", CIFAR10_FILES, ("cifar-10-python.tar.gz", "cifar-10-batches-py"),
                           *BUILTIN_SETS["cifar10"], (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), layout="cifar10"),
    "kmnist": DatasetSpec("KMNIST", _idx_files("KMNIST"), ("KMNIST",), *TORCHVISION_SETS["KMNIST"]),
    **{f"emnist_{split}": DatasetSpec("EMNIST", _idx_files("EMNIST", f"emnist-{split}-", ("train", "test")), ("EMNIST",),
                                      TORCHVISION_SETS["EMNIST"][0], classes, options=(("split", split),),
                                      label_offset=int(split == "letters"))
       for split, classes in EMNIST_SPLITS.items()},
    "svhn": DatasetSpec("SVHN", ("train_32x32.mat", "test_32x32.mat"), ("train_32x32.mat", "test_32x32.mat"),
                        *TORCHVISION_SETS["SVHN"], layout="svhn"),
    "cifar100": DatasetSpec("CIFAR100", tuple(f"cifar-100-python/{f}" for f in ("train", "test", "meta")),
                            ("cifar-100-python.tar.gz", "cifar-100-python"), *TORCHVISION_SETS["CIFAR100"], layout="cifar100"),
}


@dataclass(frozen=True)
class Source:
    """Where a configured data set's files are and what they hold: `key` names its cache file."""

    key: str
    root: Path
    spec: DatasetSpec


def source(ds_cfg: Any) -> Source:
    """The files of a set known by name (under dataset.root) or of a folder of images
    (dataset.path, listed here; ConfigError when it holds no data set)."""
    if ds_cfg.name == "folder":
        layout = datafiles.folder_layout(ds_cfg)
        files = tuple(f for f, _ in layout.train + layout.test)
        shape = datafiles.image_shape(layout.root / files[0])
        return Source("folder", layout.root, DatasetSpec("", files, (), shape, len(layout.classes), layout="folder", folder=layout))
    key = ds_cfg.name if ds_cfg.name != "torchvision" else "emnist_" + ds_cfg.split if ds_cfg.set == "EMNIST" else ds_cfg.set.lower()
    return Source(key, dataset_root(ds_cfg), SPECS[key])


def dataset_root(ds_cfg: Any) -> Path:
    """`dataset.root` made absolute against the directory regexp was run from (Hydra does not chdir)."""
    return Path(os.getcwd()) / Path(ds_cfg.root).expanduser()


def check_available(ds_cfg: Any) -> None:
    """The pre-flight for the data: the files are found under `dataset.root`, or downloaded
    there when missing and `dataset.download` is true, and must agree with each other.
    Missing data: ConfigError (one line: the folder searched, why the download failed,
    where to point regexp; a failed download leaves nothing behind). A file that does not
    fit: RunError naming it. Then the decoded-data cache is read and checked against the
    files; one that does not fit is named in a line, since load_data will decode again.
    Nothing is written here but a download. The user's own data (dataset=folder, tensors)
    are never downloaded: their path holds a data set or is refused (ConfigError naming
    dataset.path), and a file in it that does not fit is a RunError."""
    if ds_cfg.name == "tensors":
        check_split(ds_cfg, len(_tensors_raw(ds_cfg)["train_y"]))
        return
    src = source(ds_cfg)
    cache_files = _cache_files(src.key, src.root, ds_cfg.cache)
    if ds_cfg.name == "folder":
        # a fitting entry was decoded from these very files (size and mtime), each image checked
        # then: reading every header again would cost about a second per 5,000 images
        entry, misfits = _fitting_entry(src.spec, src.root, cache_files)
        if entry is None:
            _refuse_a_bad_file(src, "replace or remove it")
    else:
        _find_or_download(ds_cfg, src)
        _refuse_a_bad_file(src, REPLACE_IT)
        entry, misfits = _fitting_entry(src.spec, src.root, cache_files)
    # a folder's listing counts its training split: no need to stat its images once more
    check_split(ds_cfg, len(src.spec.folder.train) if src.spec.folder else split_facts(src.spec, src.root)["train"].count)
    if entry is None:  # said before any run dir exists; load_data decodes them and replaces the cache
        for path, why in misfits:
            print(f"regexp: the decoded-data cache {path} does not fit the raw files ({why}); decoding them again",
                  file=sys.stderr)


def _refuse_a_bad_file(src: Source, remedy: str) -> None:
    """A RunError (exit 1) naming the first file that does not fit, as at decoding time."""
    problem = _file_problem(src.spec, src.root)
    if problem is not None:
        path, what = problem
        raise RunError(f"{path}: {what}; {remedy}")


def _find_or_download(ds_cfg: Any, src: Source) -> None:
    """The files under dataset.root, downloaded when missing and allowed; ConfigError when
    they are still missing."""
    missing = _missing_files(src.spec, src.root)
    failure = None
    if missing and ds_cfg.download:
        failure = _download(src.spec, src.root)
        missing = _missing_files(src.spec, src.root)
    if missing:
        why = ("dataset.download=false" if not ds_cfg.download
               else f"the download failed: {failure}" if failure else "the download did not bring them")
        raise ConfigError(
            "dataset.root",
            ds_cfg.root,
            f"no {src.key} files found at {src.root} (expected e.g. {missing[0]}) and {why}; "
            "copy the data set there, or point REGEXP_DATA_DIR or dataset.root at a copy"
            + ("" if ds_cfg.download else ", or set dataset.download=true"),
        )


def check_split(ds_cfg: Any, n_train: int) -> None:
    """dataset.val_size against the training split's size (as _split_indices cuts it): a
    validation set that leaves nothing to train on. A dataset.limit beyond what is left means
    all of it, as "the first N samples" says."""
    if ds_cfg.val_size >= n_train:
        what = ds_cfg.path if ds_cfg.name in ("folder", "tensors") else ds_cfg.name
        raise ConfigError("dataset.val_size", ds_cfg.val_size, f"must be smaller than the {n_train} training samples of {what}")


@dataclass(frozen=True)
class SplitFacts:
    """What the raw files say about one split: its size, and its first and last samples as
    (index, image bytes in C, H, W order, label), which the cache must hold at the same
    places (so a cache with the splits swapped does not fit even where their sizes agree)."""
    count: int
    probes: tuple[tuple[int, bytes, int], ...]


def split_facts(spec: DatasetSpec, root: Path) -> dict[str, SplitFacts]:
    """SplitFacts of the "train" and "test" splits, read from the files (checked by
    _file_problem first): idx headers and two seeks, the CIFAR batches or SVHN's arrays (most
    of a second), two images of a folder, so they are kept for the process while the files
    keep their size and modification time: the pre-flight's reading serves the load."""
    return _read_split_facts(spec, root, _stamp(_fingerprint(spec, root)))


def _stamp(fingerprint: list) -> tuple:
    """The files' sizes and times as a key of _read_split_facts."""
    return tuple(map(tuple, fingerprint[1]))


@functools.lru_cache(maxsize=8)
def _read_split_facts(spec: DatasetSpec, root: Path, stamp: tuple) -> dict[str, SplitFacts]:  # stamp: the key only
    if spec.layout == "folder":
        return {split: _folder_facts(root, getattr(spec.folder, split), spec.image_shape) for split in ("train", "test")}
    if spec.layout == "svhn":
        return {split: _svhn_facts(_load_svhn(root / f)) for split, f in zip(("train", "test"), spec.files)}
    if spec.layout.startswith("cifar"):
        *train, test = [f for f in spec.files if not f.endswith("meta")]
        return {split: _cifar_facts([_load_cifar(root / f) for f in files], _cifar_labels(spec))
                for split, files in (("train", train), ("test", [test]))}
    return {split: _idx_facts(root / images, root / labels, prod(spec.image_shape), spec.label_offset)
            for split, images, labels in zip(("train", "test"), spec.files[0::2], spec.files[1::2])}


def _ends(count: int) -> tuple[int, ...]:
    """The indices a cache entry is probed at: the first and the last sample."""
    return (0, count - 1) if count else ()


def _idx_facts(images: Path, labels: Path, image_bytes: int, label_offset: int) -> SplitFacts:
    count = _idx_dims(images, 3)[0]
    probes = []
    with open(images, "rb") as xs, open(labels, "rb") as ys:
        for i in _ends(count):
            xs.seek(16 + i * image_bytes)  # past the magic number and 3 sizes
            ys.seek(8 + i)  # past the magic number and 1 size
            probes.append((i, xs.read(image_bytes), ys.read(1)[0] - label_offset))
    return SplitFacts(count, tuple(probes))


def _cifar_facts(batches: list[dict], labels_key: str) -> SplitFacts:
    count = sum(len(b[labels_key]) for b in batches)
    filled = [b for b in batches if b[labels_key]]
    ends = ((0, filled[0], 0), (count - 1, filled[-1], -1)) if count else ()
    return SplitFacts(count, tuple((i, b["data"][j].tobytes(), b[labels_key][j]) for i, b, j in ends))


def _svhn_facts(arrays: dict) -> SplitFacts:
    images, labels = arrays["X"], arrays["y"].reshape(-1)  # images [H, W, C, N], labels 1..10 (10: the digit 0)
    return SplitFacts(len(labels), tuple((i, images[..., i].transpose(2, 0, 1).tobytes(), int(labels[i]) % 10)
                                         for i in _ends(len(labels))))


def _folder_facts(root: Path, items: tuple[tuple[str, int], ...], chw: tuple[int, int, int]) -> SplitFacts:
    return SplitFacts(len(items), tuple((i, datafiles.decode_images(root, [items[i][0]], chw).tobytes(), items[i][1])
                                        for i in _ends(len(items))))


REPLACE_IT = "replace the file with a good copy (or delete the data set's folder and keep dataset.download=true)"


def _missing_files(spec: DatasetSpec, root: Path) -> list[Path]:
    return [root / f for f in spec.files if not (root / f).is_file()]


# ---------------------------------------------------------------- download
def _download(spec: DatasetSpec, root: Path) -> Optional[str]:
    """Fetch the data set into `root` with torchvision's downloader (its mirrors and
    checksums), both splits (SVHN keeps them apart). Returns None, or why it failed in a few
    words after removing what the attempt created (folders, partial files), so a refused
    command leaves nothing behind."""
    outputs = [root / p for p in spec.downloads]
    existed = {p for out in outputs if out.exists() for p in (out, *out.rglob("*"))}
    new_dirs = missing_dirs(root)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # urllib's requests have none: a dead network would hang them
    try:
        for train in (True, False):  # the second finds the first's files, but for SVHN's test split
            _torchvision_split(spec, root, train, download=True)
    except BaseException as e:
        _remove_created(outputs, existed, new_dirs)
        if not isinstance(e, Exception):  # Ctrl-C: cleaned up, then stop
            raise
        return _download_failure(e)
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return None


def _remove_created(outputs: list[Path], existed: set[Path], new_dirs: list[Path]) -> None:
    created = [p for out in outputs if out.exists() for p in (out, *out.rglob("*")) if p not in existed]
    for path in sorted(created, reverse=True):  # a folder's entries sort after it: removed first
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
    remove_empty_dirs(new_dirs)


def _download_failure(e: Exception) -> str:
    """The cause in a few words ('[Errno -2] Name or service not known', 'timed out'):
    urllib's reasons without torchvision's multi-line report around them."""
    lines = [line.strip() for line in str(e).splitlines()]
    reasons = [re.sub(r"^<urlopen error (.*)>$", r"\1", line) for line in lines
               if line and not line.startswith(("Error downloading", "Tried "))]
    return "; ".join(dict.fromkeys(reasons))[:200] or type(e).__name__


# ---------------------------------------------------------------- file checks
def _file_problem(spec: DatasetSpec, root: Path) -> Optional[tuple[Path, str]]:
    """(file, what is wrong) for the first data file that does not fit its format or the
    data set (idx header and length, image size, labels within the classes, as many labels
    as images; the same for CIFAR batches and SVHN's arrays; one size and mode for a
    folder's images), or None."""
    if spec.layout == "folder":
        return datafiles.folder_problem(spec.folder)
    if spec.layout.startswith("cifar"):
        return next(filter(None, (_cifar_problem(root / f, spec) for f in spec.files)), None)
    if spec.layout == "svhn":
        return next(filter(None, (_svhn_problem(root / f, spec) for f in spec.files)), None)
    for images, labels in zip(spec.files[0::2], spec.files[1::2]):
        problem = _idx_split_problem(root / images, root / labels, spec)
        if problem is not None:
            return problem
    return None


IDX_UBYTE = 0x08  # the idx element type of every MNIST-style file


def _idx_split_problem(images: Path, labels: Path, spec: DatasetSpec) -> Optional[tuple[Path, str]]:
    image_dims, label_dims = _idx_dims(images, 3), _idx_dims(labels, 1)
    for path, dims in ((images, image_dims), (labels, label_dims)):
        if isinstance(dims, str):
            return path, dims
    height, width = spec.image_shape[1:]
    if tuple(image_dims[1:]) != (height, width):
        return images, f"images of {image_dims[1]}x{image_dims[2]} pixels, not {height}x{width}"
    if image_dims[0] != label_dims[0]:
        return labels, f"{label_dims[0]} labels for the {image_dims[0]} images of {images.name}"
    with open(labels, "rb") as fh:
        fh.seek(8)
        found = fh.read()
    first, last = spec.label_offset, spec.label_offset + spec.num_classes - 1
    bad = next((y for y in (max(found, default=first), min(found, default=first)) if not first <= y <= last), None)
    if bad is not None:
        return labels, f"label {bad} outside the {spec.num_classes} classes ({first}..{last})"
    return None


def _idx_dims(path: Path, ndim: int) -> Any:
    """The sizes in an idx file's header, or what is wrong with the file: its magic number
    (two zero bytes, the element type, the number of dimensions) or its length."""
    with open(path, "rb") as fh:
        header = fh.read(4 + 4 * ndim)
    magic, expected = int.from_bytes(header[:4], "big"), (IDX_UBYTE << 8) | ndim
    if len(header) < 4 or magic != expected:
        return f"not an idx file of {ndim}-dimensional bytes (magic number 0x{magic:08x}, expected 0x{expected:08x})"
    if len(header) < 4 + 4 * ndim:
        return "the header ends early: truncated or corrupted"
    dims = [int.from_bytes(header[i:i + 4], "big") for i in range(4, 4 + 4 * ndim, 4)]
    size, announced = path.stat().st_size, len(header) + prod(dims)
    if size != announced:
        return f"{size} bytes where its header announces {announced}: truncated or corrupted"
    return dims


class _ArraysOnly(pickle.Unpickler):
    """CIFAR batches hold dicts, lists, strings and numpy arrays. Any other global in the
    file is refused here, so a crafted batch never reaches torchvision's plain unpickler,
    which would run it."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never does")
        return super().find_class(module, name)


def _load_cifar(path: Path) -> Any:
    with open(path, "rb") as fh:
        return _ArraysOnly(fh, encoding="latin1").load()


def _cifar_labels(spec: DatasetSpec, meta: bool = False) -> str:
    """The key of a CIFAR batch's labels (or, with `meta`, of the class names in its meta file)."""
    fine = "fine_" if spec.layout == "cifar100" else ""
    return f"{fine}label_names" if meta else f"{fine}labels"


def _cifar_problem(path: Path, spec: DatasetSpec) -> Optional[tuple[Path, str]]:
    title = spec.torchvision_class.replace("CIFAR", "CIFAR-")
    try:
        entry = _load_cifar(path)
    except Exception as e:
        return path, f"not a {title} pickle ({type(e).__name__}: {str(e).strip()[:120]}): truncated or corrupted"
    if not isinstance(entry, dict):
        return path, f"not a {title} batch (a {type(entry).__name__}, not a dict)"
    if path.name.endswith("meta"):
        key = _cifar_labels(spec, meta=True)
        names = entry.get(key)
        ok = isinstance(names, list) and len(names) == spec.num_classes
        return None if ok else (path, f"{key} must list the {spec.num_classes} classes")
    images, labels = entry.get("data"), entry.get(_cifar_labels(spec))
    row = prod(spec.image_shape)
    if getattr(images, "dtype", None) != "uint8" or getattr(images, "ndim", 0) != 2 or images.shape[1] != row:
        return path, f"'data' must be uint8 rows of {row} values ({'x'.join(map(str, spec.image_shape))} images)"
    if not isinstance(labels, list) or len(labels) != images.shape[0]:
        return path, f"{len(labels) if isinstance(labels, list) else 'no'} labels for {images.shape[0]} images"
    bad = next((y for y in labels if not (isinstance(y, int) and 0 <= y < spec.num_classes)), None)
    if bad is not None:
        return path, f"label {bad!r} outside the {spec.num_classes} classes (0..{spec.num_classes - 1})"
    return None


def _load_svhn(path: Path) -> dict:
    """SVHN's .mat arrays (scipy's reader: plain arrays, no code runs)."""
    from scipy.io import loadmat

    return loadmat(path, variable_names=("X", "y"))


def _svhn_problem(path: Path, spec: DatasetSpec) -> Optional[tuple[Path, str]]:
    try:
        arrays = _load_svhn(path)
    except Exception as e:
        return path, f"not a .mat file scipy reads ({type(e).__name__}: {str(e).strip()[:120]}): truncated or corrupted"
    images, labels = arrays.get("X"), arrays.get("y")
    height, width, channels = spec.image_shape[1], spec.image_shape[2], spec.image_shape[0]
    if getattr(images, "dtype", None) != "uint8" or getattr(images, "shape", ())[:3] != (height, width, channels):
        return path, f"'X' must be uint8 [{height}, {width}, {channels}, N] images"
    if getattr(labels, "size", -1) != images.shape[3] or labels.ndim != 2:
        return path, f"'y' must hold one label per image ({images.shape[3]}) as [N, 1]"
    bad = labels[(labels < 1) | (labels > 10)]
    if bad.size:
        return path, f"label {int(bad[0])} outside SVHN's 1..10 (10 is the digit 0)"
    return None


def load_data(ds_cfg: Any, device: Any) -> DataSplits:
    raw, stats, classes = _raw_splits(ds_cfg)
    train_idx, val_idx = _split_indices(len(raw["train_y"]), ds_cfg.val_size, ds_cfg.limit)

    def prepared(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _normalize(images, stats, device), labels.to(device)

    train_x, train_y = prepared(raw["train_x"][train_idx], raw["train_y"][train_idx])
    val_x, val_y = prepared(raw["train_x"][val_idx], raw["train_y"][val_idx])
    test_x, test_y = prepared(raw["test_x"], raw["test_y"])
    return DataSplits(
        train_x, train_y, val_x, val_y, test_x, test_y,
        num_classes=classes, input_shape=tuple(train_x.shape[1:]),
    )


Stats = Optional[tuple[Any, Any]]  # per-channel mean and std (sequences or tensors); None: values as stored


def _raw_splits(ds_cfg: Any) -> tuple[dict[str, torch.Tensor], Stats, int]:
    """Both splits' images (uint8, or float from a tensors file) and int64 labels, what to
    normalize them with, and the class count. A built-in set has published constants; the
    others the mean and std of their training split (cached with the decoded images), unless
    dataset.normalize=false."""
    if ds_cfg.name == "tensors":
        raw = _tensors_raw(ds_cfg)
        classes = ds_cfg.classes or int(max(raw["train_y"].max(), raw["test_y"].max())) + 1
        return raw, channel_stats(raw["train_x"]) if ds_cfg.normalize else None, classes
    src = source(ds_cfg)
    raw = _load_raw(src, ds_cfg.cache)
    stats = (src.spec.mean, src.spec.std) if src.spec.mean is not None else (raw.pop("mean"), raw.pop("std"))
    return raw, stats if ds_cfg.name != "folder" or ds_cfg.normalize else None, src.spec.num_classes


def _tensors_raw(ds_cfg: Any) -> dict[str, torch.Tensor]:
    """The arrays of a .npz/.pt file as both splits, checked (a RunError naming the file);
    without x_test, the fixed dataset.test_size fraction of x is held out for testing."""
    path = datafiles.tensors_file(ds_cfg)
    arrays = datafiles.load_arrays(path)
    problem = datafiles.tensors_problem(arrays, ds_cfg.classes)
    if problem is not None:
        raise RunError(f"{path}: {problem}")

    def images(key: str) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(arrays[key]))
        x = x.unsqueeze(1) if x.dim() == 3 else x  # [N, H, W]: one channel
        return x if x.dtype == torch.uint8 else x.float()

    def labels(key: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(arrays[key], dtype=np.int64))

    if "x_test" in arrays:
        return {"train_x": images("x"), "train_y": labels("y"), "test_x": images("x_test"), "test_y": labels("y_test")}
    x, y = images("x"), labels("y")
    train, test = (torch.tensor(i) for i in datafiles.holdout(len(y), ds_cfg.test_size))
    return {"train_x": x[train], "train_y": y[train], "test_x": x[test], "test_y": y[test]}


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (float64 [C]) of images in [0, 1] (uint8 / 255) or as stored
    (float), summed over chunks so that a large set needs no float copy of itself. A constant
    channel gets std 1 (it is only centred)."""
    channels = images.shape[1]
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    total, squares = torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
    for chunk in images.split(4096):
        values = chunk.transpose(0, 1).reshape(channels, -1).double().div_(scale)
        total += values.sum(1)
        squares += values.square().sum(1)
    count = max(images.numel() // channels, 1)
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def _split_indices(n_train: int, val_size: int, limit: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation indices. The fixed generator, not the run seed, picks the
    validation set, so every run of a study validates on the same samples."""
    if val_size >= n_train:
        raise ConfigError("dataset.val_size", val_size, f"must be smaller than the {n_train} training samples")
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(0))
    n_kept = n_train - val_size
    train_idx = order[:n_kept].sort().values  # original order, so `limit` means "the first N samples"
    return train_idx[:limit], order[n_kept:]


def _normalize(images: torch.Tensor, stats: Stats, device: Any) -> torch.Tensor:
    # uint8 crosses to the device: a quarter of the bytes float32 would need
    x = images.to(device).float()
    if images.dtype == torch.uint8:
        x.div_(255)
    if stats is None:
        return x
    mean, std = (torch.as_tensor(v, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) for v in stats)
    return x.sub_(mean).div_(std)


# ---------------------------------------------------------------- decoding and its cache
def _load_raw(src: Source, cache: str) -> dict[str, torch.Tensor]:
    """uint8 [N, C, H, W] images and int64 [N] labels of both splits (and, for a set without
    constants, the training split's mean and std): from the cache when it is current and fits
    the raw files, else decoded and cached (check_available has said why)."""
    cache_files = _cache_files(src.key, src.root, cache)
    entry, _ = _fitting_entry(src.spec, src.root, cache_files)
    if entry is None:
        entry = _decode(src)
        _write_cache(cache_files, {"fingerprint": _fingerprint(src.spec, src.root), **entry}, src.root)
    return entry


def _decode(src: Source) -> dict[str, torch.Tensor]:
    """Both splits decoded (PIL for a folder, torchvision for the rest), with the training
    split's mean and std where the set has no constants."""
    spec, root = src.spec, src.root
    if spec.layout == "folder":
        entry = {f"{split}_{kind}": tensor for split in ("train", "test")
                 for kind, tensor in zip("xy", _decode_folder(root, getattr(spec.folder, split), spec.image_shape))}
    else:
        entry = _read_with_torchvision(src)
    if spec.mean is None:
        entry["mean"], entry["std"] = channel_stats(entry["train_x"])
    return entry


def _decode_folder(root: Path, items: tuple[tuple[str, int], ...], chw: tuple[int, int, int]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    images = datafiles.decode_images(root, [f for f, _ in items], chw)
    return torch.from_numpy(images), torch.tensor([label for _, label in items], dtype=torch.int64)


def _fitting_entry(spec: DatasetSpec, root: Path, cache_files: list[Path]
                   ) -> tuple[Optional[dict[str, torch.Tensor]], list[tuple[Path, str]]]:
    """The first cache entry that is current and fits the raw files (split_facts), or None;
    and the cache files met on the way that do not fit, with why."""
    fingerprint = _fingerprint(spec, root)
    misfits = []
    for path in cache_files if fingerprint is not None else []:
        try:
            entry = _read_cache(path, fingerprint)
            if entry is not None:
                _check_entry(entry, spec, _read_split_facts(spec, root, _stamp(fingerprint)))
                return entry, misfits
        except CacheMisfit as e:
            misfits.append((path, str(e)))
    return None, misfits


def cache_dir() -> Path:
    """The user's cache directory for decoded data sets: $REGEXP_CACHE_DIR, else
    $XDG_CACHE_HOME/regexp, else ~/.cache/regexp (where torch hub and Hugging Face keep theirs)."""
    if os.environ.get("REGEXP_CACHE_DIR"):
        return Path(os.environ["REGEXP_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "regexp"


def _cache_files(name: str, root: Path, cache: str) -> list[Path]:
    """Where `dataset.cache` reads and writes the decoded data set, first choice first. In
    the user's directory the file is keyed by the root, so roots do not evict each other;
    `beside_data` falls back to it when the data folder cannot be written."""
    in_user_dir = cache_dir() / f"{name}-{hashlib.sha256(str(root).encode()).hexdigest()[:16]}.pt"
    return {"user": [in_user_dir], "beside_data": [root / "regexp-cache" / f"{name}.pt", in_user_dir], "off": []}[cache]


def _fingerprint(spec: DatasetSpec, root: Path) -> Optional[list]:
    """Path, size and mtime of every source file; None while any is missing. A folder's
    images (tens of thousands) are summed up in one digest, which torch.load reads at once."""
    stats, base = [], str(root)
    for f in spec.files:
        path = f"{base}/{f}"  # not Path, not os.path.join: a folder of images may have a million files
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        stats.append([path, st.st_size, st.st_mtime_ns])
    if spec.layout == "folder":
        stats = [[base, len(stats), hashlib.sha256(repr(stats).encode()).hexdigest()]]
    return [CACHE_VERSION, stats]


class CacheMisfit(Exception):
    """A file at a cache path that is not an entry for these raw files: why, in a few words."""


def _read_cache(path: Path, fingerprint: list) -> Optional[dict]:
    """The entry at `path` (its fingerprint removed) when it was written for these files by
    this CACHE_VERSION; None when there is none or the files changed since. Anything else at
    the path is a CacheMisfit."""
    fh = _open_regular(path)
    if fh is None:
        return None
    with fh, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what torch notes about a strange file (sparse tensors): the check says it
        try:
            entry = torch.load(fh, map_location="cpu", weights_only=True)
        except Exception as e:  # whatever torch.load makes of a file it did not write (empty, cut, a pickle with code)
            raise CacheMisfit(f"not a file that torch.load reads as tensors: {type(e).__name__}") from None
    if not isinstance(entry, dict):
        raise CacheMisfit(f"a {type(entry).__name__}, not a dict of tensors")
    return entry if entry.pop("fingerprint", None) == fingerprint else None


def _open_regular(path: Path) -> Optional[BinaryIO]:
    """`path` opened for reading, or None when nothing is there; CacheMisfit unless it is a
    regular file (rundir.open_regular: a FIFO does not wait for a writer)."""
    try:
        return open_regular(path)
    except FileNotFoundError:
        return None
    except NotARegularFile as e:
        raise CacheMisfit(e.why) from None


CACHE_KEYS = ("train_x", "train_y", "test_x", "test_y")
STATS_KEYS = ("mean", "std")  # float64 [C], for a set without published constants


def _check_entry(entry: dict, spec: DatasetSpec, facts: dict[str, SplitFacts]) -> None:
    """CacheMisfit unless the entry holds both splits as the raw files do: uint8 [N, C, H, W]
    images and int64 [N] labels within the classes, N as the files count it, and the files'
    first and last samples at their places (and, where the set has no constants, a finite mean
    and a positive std per channel)."""
    keys = CACHE_KEYS + (STATS_KEYS if spec.mean is None else ())
    if set(entry) != set(keys):
        raise CacheMisfit(f"it holds {', '.join(map(str, entry)) or 'nothing'}, not {', '.join(keys)}")
    for key in keys[len(CACHE_KEYS):]:
        _check_tensor(key, entry[key], torch.float64, spec.image_shape[:1])
        if not (entry[key].isfinite().all() and (key == "mean" or (entry[key] > 0).all())):
            raise CacheMisfit(f"its {key} is {entry[key].tolist()}: not a usable per-channel {key}")
    for split, fact in facts.items():
        x, y = entry[f"{split}_x"], entry[f"{split}_y"]
        _check_tensor(f"{split}_x", x, torch.uint8, (fact.count, *spec.image_shape))
        _check_tensor(f"{split}_y", y, torch.int64, (fact.count,))
        labels = y.numpy()  # numpy's min and max: torch's wake its thread pool (~25 ms on a busy 2-core machine)
        if fact.count and (labels.min() < 0 or labels.max() >= spec.num_classes):
            classes = spec.num_classes
            raise CacheMisfit(f"{split}_y has labels outside the {classes} classes (0..{classes - 1})")
        for i, image, label in fact.probes:
            raw_image = torch.frombuffer(bytearray(image), dtype=torch.uint8).view(spec.image_shape)
            if y[i] != label or not torch.equal(x[i], raw_image):
                raise CacheMisfit(f"its {split} sample {i} is not the raw files' (splits swapped or shifted?)")


def _check_tensor(key: str, value: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if not isinstance(value, torch.Tensor):
        raise CacheMisfit(f"{key} is a {type(value).__name__}, not a tensor")
    if value.layout != torch.strided:
        raise CacheMisfit(f"{key} is a {value.layout} tensor, not a dense one")
    if value.dtype != dtype or tuple(value.shape) != shape:
        expected = f"{str(dtype).removeprefix('torch.')} {list(shape)}"
        raise CacheMisfit(f"{key} is {str(value.dtype).removeprefix('torch.')} {list(value.shape)}, not {expected}")


def _write_cache(cache_files: list[Path], entry: dict, root: Path) -> None:
    """Atomically into the first place that takes it; a cache that cannot be written is skipped.
    Beside the data, the file (and a folder made for it) is readable by whoever can read the
    data folder; in the user's directory it stays private."""
    for path in cache_files:
        if not _writable(path.parent):
            continue
        shared = root in path.parents
        tmp = None
        try:
            _make_folder(path.parent, root if shared else None)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
            os.close(fd)
            torch.save(entry, tmp)
            if shared:
                os.chmod(tmp, 0o600 | (root.stat().st_mode & 0o044))
            os.replace(tmp, path)
            return
        except (OSError, RuntimeError):  # RuntimeError: torch.save's writer on a full disk
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)


def _make_folder(folder: Path, readable_as: Optional[Path]) -> None:
    """`folder` and its missing parents; made beside the data (`readable_as`), it lets in
    whoever may list that folder, whatever the umask."""
    if folder.is_dir():
        return
    folder.mkdir(parents=True, exist_ok=True)
    if readable_as is not None:
        os.chmod(folder, 0o700 | (readable_as.stat().st_mode & 0o055))


def _writable(directory: Path) -> bool:
    """Whether `directory` can be written or created. The superuser passes os.access
    everywhere, so a mode that says read-only (shared data sets) is honoured too."""
    while not directory.exists():
        directory = directory.parent
    return os.access(directory, os.W_OK) and bool(directory.stat().st_mode & 0o222)


def _read_with_torchvision(src: Source) -> dict[str, torch.Tensor]:
    """Both splits decoded by torchvision from the files check_available found (it
    downloads nothing here); a file it cannot read is named in a RunError."""
    spec, root = src.spec, src.root
    splits = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = _torchvision_split(spec, root, train, download=False)
        except Exception as e:
            path, what = _file_problem(spec, root) or (root, "missing or unreadable files; check_available says which")
            detail = (str(e).strip().splitlines() or [""])[0][:160]
            raise RunError(f"{path}: cannot read {src.key} ({type(e).__name__}: {detail}; {what}); {REPLACE_IT}") from None
        images = torch.as_tensor(ds.data)
        # MNIST-style data is [N, H, W]; CIFAR's is [N, H, W, C]; SVHN's already [N, C, H, W]
        images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2) if spec.layout != "svhn" else images
        splits[f"{split}_x"] = images.contiguous()
        labels = ds.labels if spec.layout == "svhn" else ds.targets
        splits[f"{split}_y"] = torch.as_tensor(labels, dtype=torch.int64) - spec.label_offset
    return splits


def _torchvision_split(spec: DatasetSpec, root: Path, train: bool, download: bool) -> Any:
    """torchvision's data set object of one split (SVHN names its splits; EMNIST takes its own)."""
    if spec.layout == "svhn":
        return torchvision_class(spec)(str(root), split="train" if train else "test", download=download)
    return torchvision_class(spec)(str(root), train=train, download=download, **dict(spec.options))


def torchvision_class(spec: DatasetSpec) -> type:
    from torchvision import datasets

    base = getattr(datasets, spec.torchvision_class)
    if spec.layout.startswith("cifar"):

        class CIFARFilesPresent(base):
            """CIFAR checking that its files exist instead of their md5s, which no generated
            test file can match (_check_integrity checks the batches, _load_meta the meta file).
            download() still verifies the archive's md5; a corrupt pickle fails when read."""

            train_list = [[f, None] for f, _ in base.train_list]
            test_list = [[f, None] for f, _ in base.test_list]
            meta = {**base.meta, "md5": None}

        return CIFARFilesPresent
    if spec.layout == "svhn":

        class SVHNFilesPresent(base):
            """SVHN checking that its .mat file exists instead of its md5 (as for CIFAR above);
            download() still verifies the file it fetches."""

            def _check_integrity(self) -> bool:
                return os.path.isfile(os.path.join(self.root, self.filename))

        return SVHNFilesPresent
    return base


# ---------------------------------------------------------------- augmentation
def augment_batch(x: torch.Tensor, crop: int, flip: bool) -> torch.Tensor:
    """Per-sample random shift in [-crop, crop] (zeros enter from the padding) and, when
    `flip`, a horizontal flip with probability 0.5; one gather for the whole batch.
    Draws from torch's global RNG, which the trainer seeds."""
    if crop == 0 and not flip:
        return x
    n, c, h, w = x.shape
    device = x.device
    shift_y = torch.randint(-crop, crop + 1, (n, 1), device=device)
    shift_x = torch.randint(-crop, crop + 1, (n, 1), device=device)
    cols = torch.arange(w, device=device).expand(n, w)
    if flip:
        cols = torch.where(torch.rand(n, 1, device=device) < 0.5, w - 1 - cols, cols)
    rows = torch.arange(h, device=device) + crop + shift_y  # [n, h], into the padded image
    cols = cols + crop + shift_x  # [n, w]
    padded_w = w + 2 * crop
    source = (rows[:, :, None] * padded_w + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    padded = F.pad(x, (crop, crop, crop, crop)).reshape(n, c, -1)
    return padded.gather(2, source).view(n, c, h, w)
