"""Synthetic CIFAR-10 and CIFAR-100 in the real on-disk format, for tests, benchmarks and the GPU check
where the real data set cannot be downloaded (random images: good for speed, not accuracy).

The real `cifar-10-batches-py` files are protocol-2 pickles written by Python 2, whose
strings are Python 2 `str`: they load as bytes with `encoding="bytes"` (the keys
b"data", b"labels", ... of the data set's own instructions) and as str with
`encoding="latin1"` (how torchvision reads them). Python 3's pickler writes bytes in a way
that loads as bytes under every encoding, so the Python 2 string opcodes are written here.
"""

import pickle
import struct
from pathlib import Path

import numpy as np

LABEL_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
IMAGE_BYTES = 3 * 32 * 32  # one row: the R plane, then G, then B, each 32x32 row-major


class Python2StrPickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can be extended
    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, bytes: save_py2_str}


def _dump(obj: dict, path: Path) -> None:
    with open(path, "wb") as f:
        Python2StrPickler(f, protocol=2).dump(obj)


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Path:
    """Write `<root>/cifar-100-python/` (train, test, meta) as the real set has them: random
    images, fine labels 0..99 and coarse labels 0..19 cycling. Returns `root`."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for filename, n in (("train", n_train), ("test", n_test)):
        _dump({b"filenames": [f"image_{i:06d}.png".encode() for i in range(n)], b"batch_label": f"{filename} batch".encode(),
               b"fine_labels": [i % 100 for i in range(n)], b"coarse_labels": [i % 20 for i in range(n)],
               b"data": rng.integers(0, 256, size=(n, IMAGE_BYTES), dtype=np.uint8)}, folder / filename)
    _dump({b"fine_label_names": [f"class{i}".encode() for i in range(100)],
           b"coarse_label_names": [f"superclass{i}".encode() for i in range(20)]}, folder / "meta")
    return Path(root)


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 20, seed: int = 0) -> Path:
    """Write `<root>/cifar-10-batches-py/` (five training batches of `per_batch` images, a test
    batch of `n_test`, batches.meta): random images, labels 0..9 cycling. Returns `root`."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = [(f"data_batch_{i}", per_batch, f"training batch {i} of 5") for i in range(1, 6)]
    batches.append(("test_batch", n_test, "testing batch 1 of 1"))
    for filename, n, batch_label in batches:
        labels = [i % 10 for i in range(n)]
        _dump(
            {
                b"batch_label": batch_label.encode(),
                b"labels": labels,
                b"data": rng.integers(0, 256, size=(n, IMAGE_BYTES), dtype=np.uint8),
                b"filenames": [f"{LABEL_NAMES[y].decode()}_s_{i:06d}.png".encode() for i, y in enumerate(labels)],
            },
            folder / filename,
        )
    _dump({b"label_names": LABEL_NAMES, b"num_cases_per_batch": per_batch, b"num_vis": IMAGE_BYTES}, folder / "batches.meta")
    return Path(root)
