"""The user's own data files, read without torch (docs/data.md): a folder of images with one
sub-folder per class (`dataset=folder`), or arrays in a .npz file (`dataset=tensors`; a .pt
file needs torch to be read at all). config.dataset_shape reads their headers to size a model
in the pre-flight; regexp.data checks and decodes them.

Bad input is one line: the path given is missing or holds no data set (ConfigError, exit 2,
naming dataset.path), or a file in it does not fit (RunError, exit 1, naming the file).
"""

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from regexp.rundir import ConfigError, RunError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CHANNELS = {"L": 1, "RGB": 3}  # PIL modes regexp decodes: greyscale and colour
SPLIT_FOLDERS = ("train", "test")
TENSOR_SUFFIXES = (".npz", ".pt")


def resolve(ds_cfg: Any) -> Path:
    """`dataset.path` made absolute against the directory regexp was run from (Hydra does not chdir)."""
    return Path(os.getcwd()) / Path(ds_cfg.path).expanduser()


def shape(ds_cfg: Any) -> tuple[tuple[int, int, int], int]:
    """(C, H, W) and the class count of a folder or tensors data set, from headers."""
    if ds_cfg.name == "folder":
        layout = folder_layout(ds_cfg)
        return image_shape(layout.root / layout.train[0][0]), len(layout.classes)
    return tensors_shape(ds_cfg)


def holdout(n: int, test_size: float) -> tuple[list[int], list[int]]:
    """(train, test) indices, each in order: a fixed generator (not the run seed) picks the
    `test_size` fraction held out, at least one sample, so every run tests on the same ones."""
    import numpy as np

    n_test = min(max(1, round(n * test_size)), n - 1)
    order = np.random.default_rng(0).permutation(n)
    return sorted(order[n_test:].tolist()), sorted(order[:n_test].tolist())


# ---------------------------------------------------------------- a folder of images
@dataclass(frozen=True)
class FolderLayout:
    root: Path
    classes: tuple[str, ...]  # sorted folder names; a label is an index into them
    train: tuple[tuple[str, int], ...]  # (image path relative to root, label)
    test: tuple[tuple[str, int], ...]


def folder_layout(ds_cfg: Any) -> FolderLayout:
    """The images under dataset.path: `<class>/<image>`, or `train/<class>/<image>` and
    `test/<class>/<image>` with the same class folders; without train/ and test/, a fixed
    dataset.test_size fraction is held out for testing."""
    root = resolve(ds_cfg)
    if not root.is_dir():
        raise ConfigError("dataset.path", ds_cfg.path, f"no folder at {root}; give a folder with one sub-folder of images per class")
    present = [name for name in SPLIT_FOLDERS if (root / name).is_dir()]
    if len(present) == 1:
        raise ConfigError("dataset.path", ds_cfg.path, f"{root} has {present[0]}/ but not "
                          f"{'test' if present[0] == 'train' else 'train'}/; give both, or neither (dataset.test_size is held out)")
    if present:
        classes, train = _class_images(ds_cfg, root, "train")
        test_classes, test = _class_images(ds_cfg, root, "test")
        if test_classes != classes:
            raise ConfigError("dataset.path", ds_cfg.path, f"{root}/test holds the class folders {', '.join(test_classes)}, "
                              f"not train/'s {', '.join(classes)}")
        return FolderLayout(root, classes, train, test)
    classes, items = _class_images(ds_cfg, root, "")
    train_idx, test_idx = holdout(len(items), ds_cfg.test_size)
    return FolderLayout(root, classes, tuple(items[i] for i in train_idx), tuple(items[i] for i in test_idx))


def _class_images(ds_cfg: Any, root: Path, split: str) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]]:
    base = root / split
    classes = tuple(sorted(d.name for d in os.scandir(base) if d.is_dir() and not d.name.startswith(".")))
    items = tuple((os.path.join(split, name, f), label)  # plain strings: a folder may hold a million images
                  for label, name in enumerate(classes)
                  for f in sorted(e.name for e in os.scandir(base / name) if e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file()))
    if not items:
        raise ConfigError("dataset.path", ds_cfg.path, f"no images ({', '.join(IMAGE_SUFFIXES)}) in class folders under {base}; "
                          "put each class's images in a folder of their own")
    with_images = sorted({classes[label] for _, label in items})
    if len(with_images) < 2:
        raise ConfigError("dataset.path", ds_cfg.path, f"only one class ({with_images[0]}) has images under {base}; "
                          "a classifier needs at least two class folders")
    empty = [name for name in classes if name not in with_images]
    if empty and split != "test":  # a class never trained on; a test split may lack some
        raise ConfigError("dataset.path", ds_cfg.path, f"the class folder{'s' if len(empty) > 1 else ''} "
                          f"{', '.join(empty)} under {base} hold{'' if len(empty) > 1 else 's'} no images; "
                          "put images in each class folder, or remove the empty ones")
    return classes, items


def image_shape(path: Path) -> tuple[int, int, int]:
    """(C, H, W) of an image from its header; RunError naming the file when PIL cannot read it
    or its mode is neither greyscale nor RGB."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            mode, (width, height) = image.mode, image.size
    except Exception as e:  # PIL's UnidentifiedImageError, a truncated header, an unreadable file
        raise RunError(f"{path}: not an image PIL reads ({type(e).__name__}); replace or remove it") from None
    if mode not in CHANNELS:
        raise RunError(f"{path}: a {mode} image; regexp reads greyscale (L) or RGB images: convert it")
    return CHANNELS[mode], height, width


def folder_problem(layout: FolderLayout) -> Optional[tuple[Path, str]]:
    """(image, what is wrong) for the first image whose mode or size differs from the first's, or None."""
    files = [f for f, _ in layout.train + layout.test]
    first = image_shape(layout.root / files[0])
    for f in files[1:]:
        found = image_shape(layout.root / f)
        if found != first:
            return layout.root / f, (f"a {_shape_words(found)} image where {files[0]} is {_shape_words(first)}; "
                                     "all images of a data set must have one size and mode (resize or convert them)")
    return None


def _shape_words(chw: tuple[int, int, int]) -> str:
    return f"{chw[2]}x{chw[1]} {'RGB' if chw[0] == 3 else 'greyscale'}"


def decode_images(root: Path, files: list[str], chw: tuple[int, int, int]) -> Any:
    """uint8 numpy [N, C, H, W] of the images, each checked as it is decoded (so that a cache
    entry holds checked images): RunError naming one that does not fit."""
    import numpy as np
    from PIL import Image

    out = np.empty((len(files), *chw), dtype=np.uint8)
    for i, f in enumerate(files):
        found = image_shape(root / f)
        if found != chw:
            raise RunError(f"{root / f}: a {_shape_words(found)} image where the others are {_shape_words(chw)}; "
                           "all images of a data set must have one size and mode (resize or convert them)")
        with Image.open(root / f) as image:
            pixels = np.asarray(image, dtype=np.uint8)
        out[i] = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return out


# ---------------------------------------------------------------- arrays in a file
def tensors_file(ds_cfg: Any) -> Path:
    path = resolve(ds_cfg)
    if path.suffix not in TENSOR_SUFFIXES:
        raise ConfigError("dataset.path", ds_cfg.path, "must be a .npz or .pt file holding x and y (docs/data.md)")
    if not path.is_file():
        raise ConfigError("dataset.path", ds_cfg.path, f"no file at {path}")
    return path


def tensors_shape(ds_cfg: Any) -> tuple[tuple[int, int, int], int]:
    """(C, H, W) from x's header (a .npz is not loaded, but for its labels) and the class count:
    dataset.classes, or the largest label + 1 when each of those classes has a label in y."""
    path = tensors_file(ds_cfg)
    if path.suffix == ".pt":
        arrays = load_arrays(path)
        x_shape, labels = arrays["x"].shape, {k: arrays[k] for k in ("y", "y_test") if k in arrays}
    else:
        x_shape = _npz_header(path, "x")
        labels = _npz_arrays(path, ("y", "y_test"))
        if not labels:
            raise RunError(f"{path}: no array y (the labels); a .npz needs x and y")
    if len(x_shape) not in (3, 4):
        raise RunError(f"{path}: x is {list(x_shape)}; give images as [N, C, H, W] or [N, H, W]")
    chw = tuple(x_shape[1:]) if len(x_shape) == 4 else (1, *x_shape[1:])
    if ds_cfg.classes:
        return chw, ds_cfg.classes
    top = largest_label(list(labels.values())) + 1
    problem = unsampled_classes(labels.get("y"), top)  # before a model is sized for `top` classes
    if problem is not None:
        raise RunError(f"{path}: {problem}")
    return chw, top


def largest_label(labels: list[Any]) -> int:
    """The largest of the labels of every split (-1 when there are none)."""
    return max((int(y.max()) for y in labels if y.size), default=-1)


def unsampled_classes(y: Any, top: int) -> Optional[str]:
    """What to say when some of the inferred classes 0..top-1 have no label in the training
    labels y, or None. Only labels that are 1-D non-negative integers are looked at: others
    are tensors_problem's to name. np.unique, not a bincount, so that a huge label costs no memory."""
    import numpy as np

    if y is None or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or not y.size or y.min() < 0:
        return None
    present = np.unique(y)
    if len(present) == top:
        return None
    bounds = np.concatenate(([-1], present, [top]))
    gaps = np.flatnonzero(np.diff(bounds) > 1)
    runs = [f"{bounds[i] + 1}" if bounds[i + 1] - bounds[i] == 2 else f"{bounds[i] + 1}..{bounds[i + 1] - 1}"
            for i in gaps[:3]]
    empty = top - len(present)
    more = f", ... ({empty} in all)" if len(gaps) > 3 else ""
    which = f"classes {', '.join(runs)}{more}" if empty > 1 else f"class {runs[0]}"
    return (f"{which} of 0..{top - 1} {'have' if empty > 1 else 'has'} no sample in y; labels must be 0..K-1 with "
            "every class in y: relabel them, or set dataset.classes=K when classes are missing from this file on purpose")


def _npz_arrays(path: Path, keys: Optional[tuple[str, ...]] = None) -> dict[str, Any]:
    """The arrays of a .npz (those of `keys` it holds, or all); numpy refuses object arrays,
    which would need a pickle."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files if keys is None or k in keys}
    except Exception as e:
        raise RunError(f"{path}: not a .npz file of plain arrays ({type(e).__name__}); write it with numpy.savez") from None


def _npz_header(path: Path, key: str) -> tuple[int, ...]:
    """The shape of `key` in a .npz, read from its .npy header without loading the array."""
    import numpy as np

    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            return read(fh)[0]
    except KeyError:
        raise RunError(f"{path}: no array {key}; a .npz needs x (images) and y (labels)") from None
    except Exception as e:
        raise RunError(f"{path}: not a .npz file numpy reads ({type(e).__name__}); write it with numpy.savez") from None


def load_arrays(path: Path) -> dict[str, Any]:
    """The file's arrays (x, y and, when present, x_test, y_test) as numpy; a .pt is read with
    torch.load(weights_only=True), which refuses a pickle that would run code."""
    if path.suffix == ".npz":
        return _npz_arrays(path)
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunError(f"{path}: not a file torch.load reads as tensors ({type(e).__name__}); "
                       "save a dict of tensors with torch.save") from None
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise RunError(f"{path}: a {type(loaded).__name__}, not a dict of tensors (x, y, optional x_test, y_test)")
    try:
        return {k: v.numpy() for k, v in loaded.items()}
    except (TypeError, RuntimeError) as e:  # a dtype numpy lacks (bfloat16), a sparse tensor
        raise RunError(f"{path}: a tensor numpy cannot hold ({str(e).strip()[:120]}); save dense uint8 or float32 ones") from None


def tensors_problem(arrays: dict[str, Any], classes: Optional[int]) -> Optional[str]:
    """What is wrong with the arrays of a tensors data set, in a few words, or None."""
    import numpy as np

    missing = [k for k in ("x", "y") if k not in arrays]
    if missing or ("x_test" in arrays) != ("y_test" in arrays):
        return f"it holds {', '.join(sorted(arrays)) or 'nothing'}; it needs x and y (and x_test with y_test, or neither)"
    splits = [("x", "y")] + ([("x_test", "y_test")] if "x_test" in arrays else [])
    top = classes or largest_label([arrays[y] for _, y in splits]) + 1
    for xk, yk in splits:
        x, y = arrays[xk], arrays[yk]
        if x.ndim not in (3, 4) or x.shape[1:] != arrays["x"].shape[1:]:
            return f"{xk} is {list(x.shape)}; images are [N, C, H, W] or [N, H, W], one shape in both splits"
        if not (x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating)):
            return f"{xk} is {x.dtype}; give uint8 (0..255) or float images"
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            return f"{xk} holds NaN or infinite values"
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            return f"{yk} is {y.dtype} {list(y.shape)}; labels are integers, one per image"
        if len(x) != len(y):
            return f"{len(y)} labels in {yk} for the {len(x)} images of {xk}"
        if len(y) == 0:
            return f"{xk} holds no images"
        if y.min() < 0 or y.max() >= top:
            return f"{yk} has label {y.min() if y.min() < 0 else y.max()} outside the {top} classes (0..{top - 1})"
    if not classes and (unsampled := unsampled_classes(arrays["y"], top)):
        return unsampled
    if top < 2:
        return "every label is 0: a classifier needs at least two classes"
    return None
