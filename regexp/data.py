"""Data sets as tensors on the training device, and batched augmentation (DESIGN §10).

Images are decoded once (torchvision's readers), normalized once with the data set's
per-channel constants and moved to the device once; the trainer then slices batches out
of them. The raw uint8 tensors are cached so a second run skips torchvision entirely.
Importing this module must stay light: torchvision is imported only when decoding.
"""

import hashlib
import os
import pickle
import tempfile
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from regexp.config import ConfigError, RunError

CACHE_VERSION = 1  # bump when the cached entry's layout changes


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
    torchvision_class: str  # name in torchvision.datasets
    files: tuple[str, ...]  # relative to the root: what must exist, and what the cache fingerprints
    mean: tuple[float, ...]  # per channel, of the training set in [0, 1]
    std: tuple[float, ...]
    num_classes: int = 10


def _idx_files(folder: str) -> tuple[str, ...]:
    return tuple(
        f"{folder}/raw/{split}-{kind}-ubyte"
        for split in ("train", "t10k")
        for kind in ("images-idx3", "labels-idx1")
    )


CIFAR10_FILES = tuple(
    f"cifar-10-batches-py/{name}"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
)

SPECS = {
    "mnist": DatasetSpec("MNIST", _idx_files("MNIST"), (0.1307,), (0.3081,)),
    "fashion_mnist": DatasetSpec("FashionMNIST", _idx_files("FashionMNIST"), (0.2860,), (0.3530,)),
    "cifar10": DatasetSpec("CIFAR10", CIFAR10_FILES, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def dataset_root(ds_cfg: Any) -> Path:
    """`dataset.root` made absolute against the directory regexp was run from (Hydra does not chdir)."""
    return Path(os.getcwd()) / Path(ds_cfg.root).expanduser()


def check_available(ds_cfg: Any) -> None:
    """ConfigError when the files are missing and may not be downloaded. Touches only the file system."""
    if ds_cfg.download:
        return
    root = dataset_root(ds_cfg)
    missing = [root / f for f in SPECS[ds_cfg.name].files if not (root / f).is_file()]
    if missing:
        raise ConfigError(
            "dataset.root",
            ds_cfg.root,
            f"no {ds_cfg.name} files found at {root} (expected e.g. {missing[0]}) and dataset.download=false; "
            "point dataset.root or REGEXP_DATA_DIR at the data, or set dataset.download=true",
        )


def load_data(ds_cfg: Any, device: Any) -> DataSplits:
    spec = SPECS[ds_cfg.name]
    raw = _load_raw(ds_cfg.name, dataset_root(ds_cfg), ds_cfg.download)
    train_idx, val_idx = _split_indices(len(raw["train_y"]), ds_cfg.val_size, ds_cfg.limit)

    def prepared(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _normalize(images, spec, device), labels.to(device)

    train_x, train_y = prepared(raw["train_x"][train_idx], raw["train_y"][train_idx])
    val_x, val_y = prepared(raw["train_x"][val_idx], raw["train_y"][val_idx])
    test_x, test_y = prepared(raw["test_x"], raw["test_y"])
    return DataSplits(
        train_x, train_y, val_x, val_y, test_x, test_y,
        num_classes=spec.num_classes, input_shape=tuple(train_x.shape[1:]),
    )


def _split_indices(n_train: int, val_size: int, limit: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation indices. The fixed generator, not the run seed, picks the
    validation set, so every run of a study validates on the same samples."""
    if val_size >= n_train:
        raise ConfigError("dataset.val_size", val_size, f"must be smaller than the {n_train} training samples")
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(0))
    n_kept = n_train - val_size
    train_idx = order[:n_kept].sort().values  # original order, so `limit` means "the first N samples"
    return train_idx[:limit], order[n_kept:]


def _normalize(images: torch.Tensor, spec: DatasetSpec, device: Any) -> torch.Tensor:
    # uint8 crosses to the device: a quarter of the bytes float32 would need
    x = images.to(device).float().div_(255)
    mean = torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)


# ---------------------------------------------------------------- decoding and its cache
def _load_raw(name: str, root: Path, download: bool) -> dict[str, torch.Tensor]:
    """uint8 [N, C, H, W] images and int64 labels of both splits, from the cache when it is current."""
    spec = SPECS[name]
    cache_files = _cache_files(name, root)
    fingerprint = _fingerprint(spec, root)
    if fingerprint is not None:
        for path in cache_files:
            entry = _read_cache(path, fingerprint)
            if entry is not None:
                return entry
    entry = _read_with_torchvision(name, root, download)
    _write_cache(cache_files, {"fingerprint": _fingerprint(spec, root), **entry})
    return entry


def _cache_files(name: str, root: Path) -> list[Path]:
    """Next to the data first; else a per-user directory, keyed by the root so roots do not evict each other."""
    user_dir = Path(os.environ.get("REGEXP_CACHE_DIR") or Path.home() / ".cache" / "regexp")
    root_key = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    return [root / "regexp-cache" / f"{name}.pt", user_dir / f"{name}-{root_key}.pt"]


def _fingerprint(spec: DatasetSpec, root: Path) -> Optional[list]:
    """Path, size and mtime of every source file; None while any is missing."""
    stats = []
    for f in spec.files:
        try:
            st = (root / f).stat()
        except FileNotFoundError:
            return None
        stats.append([str(root / f), st.st_size, st.st_mtime_ns])
    return [CACHE_VERSION, stats]


def _read_cache(path: Path, fingerprint: list) -> Optional[dict[str, torch.Tensor]]:
    try:
        entry = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):  # absent or unreadable: decode again
        return None
    if not isinstance(entry, dict) or entry.pop("fingerprint", None) != fingerprint:
        return None
    return entry


def _write_cache(cache_files: list[Path], entry: dict) -> None:
    """Atomically into the first place that takes it; a cache that cannot be written is skipped."""
    for path in cache_files:
        if not _writable(path.parent):
            continue
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
            os.close(fd)
            torch.save(entry, tmp)
            os.replace(tmp, path)
            return
        except (OSError, RuntimeError):  # RuntimeError: torch.save's writer on a full disk
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)


def _writable(directory: Path) -> bool:
    """Whether `directory` can be written or created. The superuser passes os.access
    everywhere, so a mode that says read-only (shared data sets) is honoured too."""
    while not directory.exists():
        directory = directory.parent
    return os.access(directory, os.W_OK) and bool(directory.stat().st_mode & 0o222)


def _read_with_torchvision(name: str, root: Path, download: bool) -> dict[str, torch.Tensor]:
    dataset_class = torchvision_class(name)
    splits = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = dataset_class(str(root), train=train, download=download)
        except Exception as e:
            broken = _broken_file(name, root)
            if broken is None and "download" not in str(e).lower():
                raise
            where = broken or root
            raise RunError(
                f"{where}: cannot read {name} ({type(e).__name__}: {str(e).strip().splitlines()[0][:160]}); "
                + ("the file is truncated or corrupted: delete it and set dataset.download=true, or copy it again"
                   if broken else "no internet? copy the data set there, or point dataset.root / REGEXP_DATA_DIR at a copy")
            ) from None
        images = torch.as_tensor(ds.data)
        # MNIST-style data is [N, H, W]; CIFAR-10's is [N, H, W, C]
        images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
        splits[f"{split}_x"] = images.contiguous()
        splits[f"{split}_y"] = torch.as_tensor(ds.targets, dtype=torch.int64)
    return splits


def _broken_file(name: str, root: Path) -> Optional[Path]:
    """The first data file whose content does not match its format (idx header vs size,
    CIFAR pickle), or None."""
    for f in SPECS[name].files:
        path = root / f
        if not path.is_file():
            continue
        if name == "cifar10":
            try:
                with open(path, "rb") as fh:
                    pickle.load(fh, encoding="latin1")
            except Exception:
                return path
            continue
        with open(path, "rb") as fh:  # idx: magic (2 zero bytes, type, ndim), then ndim big-endian sizes
            header = fh.read(4)
            ndim = header[3] if len(header) == 4 else 0
            dims = fh.read(4 * ndim)
        if len(header) < 4 or len(dims) < 4 * ndim:
            return path
        expected = 4 + 4 * ndim + prod(int.from_bytes(dims[i:i + 4], "big") for i in range(0, 4 * ndim, 4))
        if path.stat().st_size != expected:
            return path
    return None


def torchvision_class(name: str) -> type:
    from torchvision import datasets

    base = getattr(datasets, SPECS[name].torchvision_class)
    if name != "cifar10":
        return base

    class CIFAR10FilesPresent(base):
        """CIFAR-10 checking that its files exist instead of their md5s, which no generated
        test file can match (_check_integrity checks the batches, _load_meta batches.meta).
        download() still verifies the archive's md5; a corrupt pickle fails when read."""

        train_list = [[f, None] for f, _ in base.train_list]
        test_list = [[f, None] for f, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    return CIFAR10FilesPresent


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
