"""The decoded-data cache is checked against the raw files (sizes, dtypes, label range, the
first and last samples of each split) and never blocks on what sits at its path. One that
does not fit is named in one line by the pre-flight (before any run dir), then decoded again
and replaced when the data are loaded."""

import json
import os
import signal
import stat
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli
from test_data import RunsCode, ds_cfg, forbid_decoding, user_cache_dir, write_mnist  # noqa: F401 (autouse fixture)

import regexp.data as data
from regexp.data import check_available, load_data
from regexp.synthetic import write_cifar10


def beside(root: Path, name: str = "mnist") -> Path:
    return root / "regexp-cache" / f"{name}.pt"


def decoded(name: str, root: Path) -> dict:
    """What the raw files hold, decoded without any cache."""
    return data._read_with_torchvision(data.Source(name, root, data.SPECS[name]))


def cached(root: Path, name: str = "mnist") -> dict:
    return torch.load(beside(root, name), weights_only=True)


def misfit_line(path: Path, why: str) -> str:
    return f"regexp: the decoded-data cache {path} does not fit the raw files ({why}); decoding them again\n"


def assert_fits(path: Path, name: str, root: Path) -> None:
    """The file at `path` is a regular file holding exactly what the raw files decode to."""
    assert stat.S_ISREG(path.lstat().st_mode)
    entry = torch.load(path, weights_only=True)
    assert entry.pop("fingerprint") == data._fingerprint(data.SPECS[name], root)
    truth = decoded(name, root)
    assert entry.keys() == truth.keys() and all(torch.equal(entry[k], truth[k]) for k in truth)


def run_on(cfg, capsys) -> tuple[str, object]:
    """The pre-flight, then the load, as a run does them: (what the pre-flight said on stderr,
    the splits). Loading says nothing more."""
    check_available(cfg)
    said = capsys.readouterr().err
    splits = load_data(cfg, "cpu")
    assert capsys.readouterr().err == ""
    return said, splits


def assert_trains_on_the_files(splits, name: str, root: Path) -> None:
    """The splits (val_size=0: every training sample, in order) are the raw files' own."""
    truth = decoded(name, root)
    for split in ("train", "test"):
        images = data._normalize(truth[f"{split}_x"], (data.SPECS[name].mean, data.SPECS[name].std), "cpu")
        assert torch.equal(getattr(splits, f"{split}_x"), images)
        assert torch.equal(getattr(splits, f"{split}_y"), truth[f"{split}_y"])


@pytest.fixture
def mnist_cached(tmp_path) -> Path:
    """A small MNIST root whose beside_data cache was written by a first load."""
    root = write_mnist(tmp_path / "data", n_train=30, n_test=10)
    load_data(ds_cfg("mnist", root, cache="beside_data"), "cpu")
    assert beside(root).is_file()
    return root


def damage(root: Path, change) -> None:
    """Rewrite the cache's entry through `change(entry)`, keeping its fingerprint (so only a
    check of the tensors finds it)."""
    entry = cached(root)
    change(entry)
    torch.save(entry, beside(root))


def swap_splits(entry: dict) -> None:
    entry["train_x"], entry["test_x"] = entry["test_x"], entry["train_x"]
    entry["train_y"], entry["test_y"] = entry["test_y"], entry["train_y"]


TENSOR_CASES = {
    "label out of range": (lambda e: e["train_y"].__setitem__(3, 10),
                           "train_y has labels outside the 10 classes (0..9)"),
    "negative label": (lambda e: e["test_y"].__setitem__(0, -1), "test_y has labels outside the 10 classes (0..9)"),
    "a missing split": (lambda e: [e.pop("test_x"), e.pop("test_y")],
                        "it holds train_x, train_y, not train_x, train_y, test_x, test_y"),
    "cut image size": (lambda e: e.update(train_x=e["train_x"][:, :, :27].contiguous()),
                       "train_x is uint8 [30, 1, 27, 28], not uint8 [30, 1, 28, 28]"),
    "train and test swapped": (swap_splits, "train_x is uint8 [10, 1, 28, 28], not uint8 [30, 1, 28, 28]"),
    "too few labels": (lambda e: e.update(train_y=e["train_y"][:5]), "train_y is int64 [5], not int64 [30]"),
    "float images": (lambda e: e.update(test_x=e["test_x"].float()),
                     "test_x is float32 [10, 1, 28, 28], not uint8 [10, 1, 28, 28]"),
    "int32 labels": (lambda e: e.update(train_y=e["train_y"].int()), "train_y is int32 [30], not int64 [30]"),
    "labels not a tensor": (lambda e: e.update(test_y=e["test_y"].tolist()), "test_y is a list, not a tensor"),
    "sparse labels": (lambda e: e.update(test_y=e["test_y"].to_sparse()),
                      "test_y is a torch.sparse_coo tensor, not a dense one"),
    "images shifted": (lambda e: e.update(train_x=e["train_x"].roll(1, 0)),
                       "its train sample 0 is not the raw files' (splits swapped or shifted?)"),
}


@pytest.mark.filterwarnings("error")  # nothing but the line: no warning of torch's either
@pytest.mark.parametrize("case", TENSOR_CASES)
def test_a_cache_whose_tensors_do_not_fit_is_named_and_decoded_again(mnist_cached, capsys, case):
    change, why = TENSOR_CASES[case]
    damage(mnist_cached, change)
    before = beside(mnist_cached).read_bytes()
    check_available(ds_cfg("mnist", mnist_cached, cache="beside_data"))
    assert capsys.readouterr().err == misfit_line(beside(mnist_cached), why)
    assert beside(mnist_cached).read_bytes() == before  # the pre-flight writes nothing
    splits = load_data(ds_cfg("mnist", mnist_cached, cache="beside_data"), "cpu")
    assert capsys.readouterr().err == ""  # said once
    assert_trains_on_the_files(splits, "mnist", mnist_cached)
    assert_fits(beside(mnist_cached), "mnist", mnist_cached)


def test_the_right_splits_are_trained_on_after_a_swap_of_equal_sizes(tmp_path, capsys, monkeypatch):
    """Train and test of the same size: only the samples tell them apart."""
    root = write_cifar10(tmp_path / "data", per_batch=2, n_test=10)  # 10 training images, 10 test images
    cfg = ds_cfg("cifar10", root, cache="beside_data")
    load_data(cfg, "cpu")
    entry = cached(root, "cifar10")
    swap_splits(entry)
    torch.save(entry, beside(root, "cifar10"))
    said, splits = run_on(cfg, capsys)
    assert said == misfit_line(beside(root, "cifar10"),
                               "its train sample 0 is not the raw files' (splits swapped or shifted?)")
    assert_trains_on_the_files(splits, "cifar10", root)
    forbid_decoding(monkeypatch)  # replaced: the next run reads it, and says nothing
    assert run_on(cfg, capsys)[0] == ""


def test_a_fifo_at_the_cache_path_does_not_hang_the_run(mnist_cached, capsys):
    path = beside(mnist_cached)
    path.unlink()
    os.mkfifo(path)
    signal.alarm(60)  # a regression blocks in open(): fail instead of hanging the suite
    try:
        said, splits = run_on(ds_cfg("mnist", mnist_cached, cache="beside_data"), capsys)
    finally:
        signal.alarm(0)
    assert said == misfit_line(path, "not a regular file (a FIFO)")
    assert_trains_on_the_files(splits, "mnist", mnist_cached)
    assert_fits(path, "mnist", mnist_cached)


def test_a_symlink_to_dev_zero_is_replaced_by_a_file(mnist_cached, capsys):
    path = beside(mnist_cached)
    path.unlink()
    path.symlink_to("/dev/zero")
    said, _ = run_on(ds_cfg("mnist", mnist_cached, cache="beside_data"), capsys)
    assert said == misfit_line(path, "not a regular file (a character device)")
    assert not path.is_symlink() and Path("/dev/zero").is_char_device()
    assert_fits(path, "mnist", mnist_cached)


def test_a_directory_at_the_cache_path_is_left_and_the_user_cache_used(mnist_cached, user_cache_dir, capsys,
                                                                       monkeypatch):
    path = beside(mnist_cached)
    path.unlink()
    (path / "notes").mkdir(parents=True)
    cfg = ds_cfg("mnist", mnist_cached, cache="beside_data")
    assert run_on(cfg, capsys)[0] == misfit_line(path, "not a regular file (a directory)")
    assert (path / "notes").is_dir()  # never removed
    [written] = user_cache_dir.glob("mnist-*.pt")
    assert_fits(written, "mnist", mnist_cached)
    forbid_decoding(monkeypatch)
    assert run_on(cfg, capsys)[0] == ""  # the user's entry fits: nothing is decoded, nothing said


@pytest.mark.parametrize("content, why", [
    (b"", "not a file that torch.load reads as tensors: EOFError"),
    (b"PK\x03\x04 not a zip", "not a file that torch.load reads as tensors: RuntimeError"),
])
def test_an_empty_or_cut_cache_file_is_decoded_again(mnist_cached, capsys, content, why):
    beside(mnist_cached).write_bytes(content)
    said, _ = run_on(ds_cfg("mnist", mnist_cached, cache="beside_data"), capsys)
    assert said == misfit_line(beside(mnist_cached), why)
    assert_fits(beside(mnist_cached), "mnist", mnist_cached)


def test_a_symlink_loop_at_the_cache_path_is_replaced(mnist_cached, capsys):
    path = beside(mnist_cached)
    path.unlink()
    path.symlink_to(path.name)
    said, _ = run_on(ds_cfg("mnist", mnist_cached, cache="beside_data"), capsys)
    assert said == misfit_line(path, "cannot read (Too many levels of symbolic links)")
    assert_fits(path, "mnist", mnist_cached)


def test_an_unreadable_cache_file_is_named(mnist_cached, capsys, monkeypatch):
    """chmod 000 does not stop the superuser the tests run as: the refusal is the kernel's, simulated."""
    path, real_open = beside(mnist_cached), os.open

    def refuse(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    check_available(ds_cfg("mnist", mnist_cached, cache="beside_data"))
    assert capsys.readouterr().err == misfit_line(path, "cannot read (Permission denied)")


def test_the_preflight_writes_no_cache(tmp_path, user_cache_dir, monkeypatch):
    """A first run's pre-flight reads the files only; the data are decoded (and cached) when loaded."""
    root = write_mnist(tmp_path / "data", n_train=30, n_test=10)
    forbid_decoding(monkeypatch)
    check_available(ds_cfg("mnist", root, cache="beside_data"))
    assert not (root / "regexp-cache").exists() and not user_cache_dir.exists()


def test_a_cache_with_code_is_never_run(mnist_cached, tmp_path, capsys):
    marker = tmp_path / "ran"
    torch.save({"fingerprint": cached(mnist_cached)["fingerprint"], "x": RunsCode(marker)}, beside(mnist_cached))
    said, _ = run_on(ds_cfg("mnist", mnist_cached, cache="beside_data"), capsys)
    assert not marker.exists()
    assert said == misfit_line(beside(mnist_cached), "not a file that torch.load reads as tensors: UnpicklingError")
    assert_fits(beside(mnist_cached), "mnist", mnist_cached)


def test_a_cache_that_is_not_a_dict_is_decoded_again(mnist_cached, capsys):
    torch.save([torch.zeros(3)], beside(mnist_cached))
    said, _ = run_on(ds_cfg("mnist", mnist_cached, cache="beside_data"), capsys)
    assert said == misfit_line(beside(mnist_cached), "a list, not a dict of tensors")
    assert_fits(beside(mnist_cached), "mnist", mnist_cached)


def test_an_entry_of_another_cache_version_is_replaced_without_a_word(mnist_cached, capsys):
    damage(mnist_cached, lambda e: e["fingerprint"].__setitem__(0, data.CACHE_VERSION - 1))
    assert run_on(ds_cfg("mnist", mnist_cached, cache="beside_data"), capsys)[0] == ""  # stale, as after a change
    assert_fits(beside(mnist_cached), "mnist", mnist_cached)


def test_a_misfit_that_cannot_be_replaced_is_said_each_time_and_the_user_cache_used(mnist_cached, user_cache_dir,
                                                                                     capsys):
    damage(mnist_cached, TENSOR_CASES["label out of range"][0])
    before = beside(mnist_cached).read_bytes()
    folder = beside(mnist_cached).parent
    folder.chmod(0o555)  # the superuser passes os.access; the mode is honoured anyway
    try:
        cfg = ds_cfg("mnist", mnist_cached, cache="beside_data")
        said, splits = run_on(cfg, capsys)
        assert said == misfit_line(beside(mnist_cached), TENSOR_CASES["label out of range"][1])
        assert_trains_on_the_files(splits, "mnist", mnist_cached)
        assert beside(mnist_cached).read_bytes() == before  # not writable: left as it was
        [written] = user_cache_dir.glob("mnist-*.pt")
        assert_fits(written, "mnist", mnist_cached)
        assert run_on(cfg, capsys)[0] == ""  # the user's entry fits: nothing to decode, nothing said
    finally:
        folder.chmod(0o755)


def test_load_data_checks_the_cache_too(mnist_cached, capsys):
    """Called without the pre-flight: the cache is checked all the same (the pre-flight says why)."""
    damage(mnist_cached, TENSOR_CASES["label out of range"][0])
    splits = load_data(ds_cfg("mnist", mnist_cached, cache="beside_data"), "cpu")
    assert_trains_on_the_files(splits, "mnist", mnist_cached)
    assert_fits(beside(mnist_cached), "mnist", mnist_cached)


def test_a_fitting_cache_is_read_without_decoding_or_a_line(mnist_cached, capsys, monkeypatch):
    forbid_decoding(monkeypatch)
    assert run_on(ds_cfg("mnist", mnist_cached, cache="beside_data"), capsys)[0] == ""


# ---------------------------------------------------------------- who may read it
@pytest.mark.parametrize("root_mode, file_mode, folder_mode", [(0o755, 0o644, 0o755), (0o750, 0o640, 0o750),
                                                               (0o700, 0o600, 0o700)], ids=["0755", "0750", "0700"])
def test_a_cache_beside_the_data_is_readable_by_whoever_reads_the_data(tmp_path, root_mode, file_mode, folder_mode):
    root = write_mnist(tmp_path / "data", n_train=30, n_test=10)
    root.chmod(root_mode)
    previous = os.umask(0o077)  # a private umask must not make the shared cache private
    try:
        load_data(ds_cfg("mnist", root, cache="beside_data"), "cpu")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(beside(root).stat().st_mode) == file_mode
    assert stat.S_IMODE(beside(root).parent.stat().st_mode) == folder_mode


def test_the_user_cache_stays_private(tmp_path, user_cache_dir):
    root = write_mnist(tmp_path / "data", n_train=30, n_test=10)
    load_data(ds_cfg("mnist", root), "cpu")
    [written] = user_cache_dir.glob("mnist-*.pt")
    assert stat.S_IMODE(written.stat().st_mode) == 0o600


# ---------------------------------------------------------------- through the real CLI
@pytest.mark.slow
@pytest.mark.parametrize("case", ["label out of range", "fifo"])
def test_the_cli_decodes_a_misfit_cache_again_before_the_run_and_trains(tmp_path, case):
    root = write_mnist(tmp_path / "data", n_train=300, n_test=20)
    load_data(ds_cfg("mnist", root, cache="beside_data"), "cpu")
    path = beside(root)
    if case == "fifo":
        path.unlink()
        os.mkfifo(path)
        why = "not a regular file (a FIFO)"
    else:
        change, why = TENSOR_CASES[case]
        damage(root, change)
    cwd = tmp_path / "work"
    cwd.mkdir()
    out = run_cli(["train", "logger=none", "dataset.cache=beside_data", *TINY], cwd, data_root=root, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr == misfit_line(path, why)
    [summary] = cwd.glob("outputs/*/*/summary.json")
    assert json.loads(summary.read_text())["status"] == "completed"
    assert_fits(path, "mnist", root)
