"""A hostile and a careless user of the Python API, the decoded-data cache, the W&B agent's
environment and the command line: each case asserts the exit (or the exception), its one line,
and what is, or is not, on disk afterwards."""

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli
from test_data import ds_cfg, write_mnist

import regexp
import regexp.api
from regexp import data
from regexp.compose import compose_and_validate
from regexp.data import load_data
from regexp.lock import DirHeld, check_free, writing
from regexp.rundir import ConfigError, RunError

QUIET = [*TINY, "logger=none"]


def listing(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: what a refusal must leave as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def users_dir(tmp_path: Path) -> Path:
    """A folder of the user's own files, one of them named as a run's record is."""
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    (folder / "metrics.jsonl").write_text('{"mine": 1}\n')
    return folder


def one_line(text: str) -> str:
    assert text.count("\n") <= 1, text
    return text.strip()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "user-cache"
    monkeypatch.setenv("REGEXP_CACHE_DIR", str(path))
    return path


@pytest.fixture
def no_writes(monkeypatch):
    """A run that gets past its checks fails before its first write (a regression must not train into /)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the run went on to write its run dir")

    monkeypatch.setattr(regexp.api, "train_log", refuse)


# ---------------------------------------------------------------- the Python API
def test_run_refuses_root_as_its_run_dir(no_writes):
    with pytest.raises(ConfigError) as refused:
        regexp.run(QUIET, run_dir="/")
    assert one_line(str(refused.value)).startswith("run_dir=/: holds files that are not a run's (")
    assert str(refused.value).endswith("; choose a new or empty run dir")
    assert not Path("/summary.json").exists() and not Path("/.regexp.lock").exists()


def test_run_refuses_hydra_run_dir_of_root(no_writes):
    with pytest.raises(ConfigError, match=r"^run_dir=/: holds files that are not a run's"):
        regexp.run([*QUIET, "hydra.run.dir=/"])


def test_run_refuses_a_dir_of_the_users_files_and_leaves_it_as_it_was(tmp_path):
    folder = users_dir(tmp_path)
    before = listing(folder)
    with pytest.raises(ConfigError) as refused:
        regexp.run(QUIET, run_dir=folder)
    assert str(refused.value) == (f"run_dir={folder}: holds files that are not a run's (metrics.jsonl, notes.txt); "
                                  "choose a new or empty run dir")
    assert listing(folder) == before and sorted(p.name for p in folder.iterdir()) == ["metrics.jsonl", "notes.txt"]


@pytest.mark.parametrize("name,resume", [("checkpoint.pt", []), ("metrics.jsonl", ["resume=auto"])])
def test_run_refuses_a_dir_holding_only_a_file_named_as_a_record_but_no_run(tmp_path, name, resume):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / name).write_bytes(b"my own work")
    with pytest.raises(ConfigError) as refused:
        regexp.run([*QUIET, *resume], run_dir=folder)
    assert str(refused.value) == (f"run_dir={folder}: holds files that are not a run's ({name}); "
                                  "choose a new or empty run dir")
    assert listing(folder) == {name: b"my own work"}


def test_run_refuses_a_run_dir_holding_nul(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as refused:
        regexp.run(QUIET, run_dir="runs\0x")
    assert str(refused.value) == ("run_dir='runs\\x00x': must be a directory's path (a non-empty str or os.PathLike), "
                                  "without NUL characters")
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_a_path_holding_nul():
    with pytest.raises(ConfigError, match=r"^run_dir=PosixPath\('a/\\x00b'\): must be a directory's path"):
        regexp.load(Path("a") / "\0b")


def test_run_refuses_overrides_from_a_generator(tmp_path):
    with pytest.raises(ConfigError, match=r"^overrides=<generator object .*>: must be a list of non-empty strings"):
        regexp.run((o for o in QUIET), run_dir=tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_run_refuses_a_run_dir_that_is_a_file(tmp_path):
    afile = tmp_path / "results"
    afile.write_text("mine")
    with pytest.raises(ConfigError) as refused:
        regexp.run(QUIET, run_dir=afile)
    assert str(refused.value) == f"run_dir={afile}: output directory cannot be created: {afile} is a file"
    assert afile.read_text() == "mine" and list(tmp_path.iterdir()) == [afile]


@pytest.mark.parametrize("hostile", ["/etc", "/", "/dev/null"])
def test_run_refuses_a_resume_of_a_dir_that_is_no_run(tmp_path, hostile):
    with pytest.raises(ConfigError) as refused:
        regexp.run([*QUIET, f"resume={hostile}"], run_dir=tmp_path / "run")
    assert str(refused.value).startswith(f"resume={hostile}: must be a run directory holding checkpoint.pt")
    assert list(tmp_path.iterdir()) == []


def test_load_of_root_and_of_a_file_is_one_run_error(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for path, why in (("/", "No such file or directory"), (afile, "Not a directory")):
        with pytest.raises(RunError) as refused:
            regexp.load(path)
        assert one_line(str(refused.value)) == f"{Path(path) / 'summary.json'}: cannot read ({why})"


def test_compare_refuses_a_generator_and_counts_a_repeated_run_once(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"status": "completed", "metrics": {"test/acc": 0.5}}))
    with pytest.raises(ConfigError, match=r"^paths=<generator object .*>: must be a non-empty list"):
        regexp.compare(p for p in [run])
    table = regexp.compare([run] * 2000 + [str(run)])
    assert [r["run_dir"] for r in table["runs"]] == [str(run)]


def test_a_run_in_another_thread_holding_the_dir_is_named_as_such(tmp_path):
    run_dir = tmp_path / "run"
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with writing([run_dir], "run_dir"):
            held.set()
            done.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        with pytest.raises(DirHeld) as refused:
            check_free(run_dir, "run_dir", str(run_dir))
    finally:
        done.set()
        holder.join()
    assert str(refused.value).startswith(
        f"run_dir={run_dir}: a run in another thread of this process writes {run_dir} now")
    assert not (run_dir / ".regexp.lock").exists()


# ---------------------------------------------------------------- composition: syntax and the environment
@pytest.mark.parametrize("bad,why", [
    ("optimizer.lr=1e-3=4", "mismatched input '='"),
    ('"seed=1', "LexerNoViableAltException"),
    ("logger.project=проект", "LexerNoViableAltException"),
])
def test_a_syntax_error_names_the_override_that_has_it(bad, why):
    with pytest.raises(ConfigError) as refused:
        compose_and_validate(["seed=1", "model=mlp", bad, "epochs=2"])
    assert one_line(str(refused.value)).startswith(f"override={bad}: {why}")


def test_a_quoted_unicode_value_is_taken():
    assert compose_and_validate(["logger.project='проект'"]).logger.project == "проект"


@pytest.mark.parametrize("mode,shown", [
    ("bogus", "bogus"), ("", ""), ("OFFLINE", "OFFLINE"), ("off\nline", "'off\\nline'")])
def test_a_wandb_mode_that_w_and_b_refuses_is_one_line(monkeypatch, mode, shown):
    monkeypatch.setenv("WANDB_MODE", mode)
    with pytest.raises(ConfigError) as refused:
        compose_and_validate(["logger=wandb"])
    assert str(refused.value) == (f"WANDB_MODE={shown}: must be one of online, offline, disabled, shared, dryrun, run "
                                  "(W&B's modes; or unset it, or logger=none)")


@pytest.mark.parametrize("mode", ["offline", "disabled", "dryrun"])
def test_w_and_b_modes_stay_allowed_and_any_is_allowed_without_w_and_b(monkeypatch, mode):
    monkeypatch.setenv("WANDB_MODE", mode)
    assert compose_and_validate(["logger=wandb"]).logger.name == "wandb"
    monkeypatch.setenv("WANDB_MODE", "bogus")
    assert compose_and_validate(["logger=none"]).logger.name == "none"


# ---------------------------------------------------------------- the decoded-data cache
def test_a_cache_dir_that_is_a_file_is_left_alone_and_the_data_loads(tmp_path, monkeypatch):
    root = write_mnist(tmp_path / "data")
    afile = tmp_path / "cache-is-a-file"
    afile.write_text("mine")
    monkeypatch.setenv("REGEXP_CACHE_DIR", str(afile))
    splits = load_data(ds_cfg("mnist", root), "cpu")
    assert splits.train_x.shape[0] == 30 and afile.read_text() == "mine"


def test_a_cache_dir_that_is_a_fifo_does_not_hang(tmp_path, monkeypatch):
    root = write_mnist(tmp_path / "data")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    monkeypatch.setenv("REGEXP_CACHE_DIR", str(fifo))
    splits = load_data(ds_cfg("mnist", root), "cpu")
    assert splits.train_x.shape[0] == 30 and fifo.is_fifo()


def test_a_cache_dir_that_cannot_be_made_is_skipped(tmp_path, monkeypatch):
    root = write_mnist(tmp_path / "data")
    monkeypatch.setenv("REGEXP_CACHE_DIR", "/proc/regexp-cache")
    splits = load_data(ds_cfg("mnist", root), "cpu")
    assert splits.train_x.shape[0] == 30 and not Path("/proc/regexp-cache").exists()


def test_a_cache_of_another_data_root_is_not_read_for_this_one(tmp_path, cache_dir):
    root_a = write_mnist(tmp_path / "a", n_train=30)
    root_b = write_mnist(tmp_path / "b", n_train=20)
    load_data(ds_cfg("mnist", root_a), "cpu")
    [cache_a] = data._cache_files("mnist", root_a, "user")
    [cache_b] = data._cache_files("mnist", root_b, "user")
    assert cache_a != cache_b
    shutil.copyfile(cache_a, cache_b)  # a's entry at b's name
    splits = load_data(ds_cfg("mnist", root_b), "cpu")
    assert splits.train_x.shape[0] == 20
    assert torch.load(cache_b, weights_only=True)["fingerprint"] == data._fingerprint(data.SPECS["mnist"], root_b)


@pytest.mark.parametrize("value,line", [
    ("bogus", "dataset.cache=bogus: must be one of user, beside_data, off"),
    ("null", "dataset.cache=null: must be a string"),
])
def test_a_bad_dataset_cache_value_is_one_line(value, line):
    with pytest.raises(ConfigError) as refused:
        compose_and_validate([f"dataset.cache={value}"])
    assert str(refused.value) == line


@pytest.mark.slow
def test_two_processes_writing_the_cache_at_once_both_load_and_leave_one_fitting_file(tmp_path, cache_dir):
    root = write_mnist(tmp_path / "data", n_train=600, n_test=100)
    code = ("import sys; from regexp import data; "
            "entry = data._load_raw(data.Source('mnist', data.Path(sys.argv[1]), data.SPECS['mnist']), 'user'); print(entry['train_x'].shape[0])")
    env = dict(os.environ, REGEXP_CACHE_DIR=str(cache_dir))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and [o.strip() for o, _ in outs] == ["600", "600"], outs
    assert [p.name for p in cache_dir.iterdir()] == [data._cache_files("mnist", root, "user")[0].name]
    entry, misfits = data._fitting_entry(data.SPECS["mnist"], root, data._cache_files("mnist", root, "user"))
    assert entry is not None and misfits == []


# ---------------------------------------------------------------- the command line
def test_cli_a_double_dash_before_the_command_is_one_line(tmp_path):
    out = run_cli(["--", "train", *QUIET], tmp_path)
    assert out.returncode == 2 and list(tmp_path.iterdir()) == []
    assert one_line(out.stderr) == ("regexp: error: unknown command '--'; commands: train, compare, diagnose, "
                                    "plot, report, check, lr-find (see regexp --help)")


def test_cli_an_equals_sign_in_a_value_names_its_override(tmp_path):
    out = run_cli(["train", *QUIET, "optimizer.lr=1e-3=4"], tmp_path)
    assert out.returncode == 2 and list(tmp_path.iterdir()) == []
    assert one_line(out.stderr) == "regexp: error: override=optimizer.lr=1e-3=4: mismatched input '=' expecting <EOF>"


def test_cli_a_very_long_value_is_one_line_and_nothing_is_written(tmp_path):
    out = run_cli(["train", *QUIET, "model.activation=" + "x" * 20000], tmp_path)
    assert out.returncode == 2 and list(tmp_path.iterdir()) == []
    assert one_line(out.stderr).endswith(": must be one of relu, tanh, sigmoid, gelu")


def test_cli_cfg_job_never_prints_a_secret_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_SECRET", "hunter2VALUE")
    out = run_cli(["train", "--cfg", "job", "logger.project=${oc.env:MY_SECRET}"], tmp_path)
    assert out.returncode == 2 and list(tmp_path.iterdir()) == []
    assert "hunter2VALUE" not in out.stdout + out.stderr
    assert one_line(out.stderr).startswith(
        "regexp: error: logger.project=${oc.env:MY_SECRET}: refused: MY_SECRET looks like a secret")


@pytest.mark.slow  # the check of what a run dir holds imports torch
def test_cli_a_dir_of_the_users_files_is_refused_as_hydra_run_dir(tmp_path):
    folder = users_dir(tmp_path)
    before = listing(folder)
    out = run_cli(["train", *QUIET, f"hydra.run.dir={folder}"], tmp_path)
    assert out.returncode == 2, out.stderr
    assert one_line(out.stderr) == (f"regexp: error: hydra.run.dir={folder}: holds files that are not a run's "
                                    "(metrics.jsonl, notes.txt); choose a new or empty run dir")
    assert listing(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]


@pytest.mark.parametrize("mode", ["bogus", ""])
def test_cli_a_bad_wandb_mode_is_refused_before_anything_is_written(tmp_path, monkeypatch, mode):
    monkeypatch.setenv("WANDB_MODE", mode)
    out = run_cli(["train", *TINY, "logger=wandb", "hydra.run.dir=run"], tmp_path)
    assert out.returncode == 2 and list(tmp_path.iterdir()) == []
    assert one_line(out.stderr).startswith(f"regexp: error: WANDB_MODE={mode}: must be one of online, offline")


def test_cli_a_newline_in_the_agents_run_id_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_RUN_ID", "ab\ncd")
    out = run_cli(["train", *QUIET, "hydra.run.dir=run"], tmp_path)
    assert out.returncode == 2 and list(tmp_path.iterdir()) == []
    assert one_line(out.stderr).startswith("regexp: error: WANDB_RUN_ID='ab\\ncd': a W&B id must be")


@pytest.mark.slow
def test_cli_the_sweep_flag_twice_is_one_sweep(tmp_path, data_root):
    out = run_cli(["train", "-m", "-m", "seed=1,2", *QUIET, "hydra.sweep.dir=sweep"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.name.isdigit()) == ["0", "1"]
    assert json.loads((tmp_path / "sweep" / "1" / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_cli_an_offline_run_with_a_unicode_project_names_a_sync_dir_that_exists(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "проект")
    monkeypatch.setenv("WANDB_ENTITY", "a/b")
    out = run_cli(["train", *TINY, "logger=wandb", "hydra.run.dir=run"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr
    [line] = [ln for ln in out.stdout.splitlines() + out.stderr.splitlines() if "wandb sync" in ln]
    sync_dir = Path(line.rsplit("wandb sync ", 1)[1])
    assert sync_dir.is_dir() and sync_dir.parent == tmp_path / "run" / "wandb"


@pytest.mark.slow
def test_run_twice_in_a_row_leaves_the_first_record_as_it_was(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("REGEXP_DATA_DIR", str(data_root))
    run_dir = tmp_path / "run"
    regexp.run(QUIET, run_dir=run_dir)
    before = listing(run_dir)
    with pytest.raises(ConfigError, match=r"holds a run already; continue it with resume="):
        regexp.run(QUIET, run_dir=run_dir)
    assert listing(run_dir) == before


def test_cli_diagnose_of_root_is_one_line(tmp_path):
    out = run_cli(["diagnose", "/"], tmp_path)
    assert out.returncode == 2 and list(tmp_path.iterdir()) == []
    assert one_line(out.stderr) == "regexp: error: RUN_DIR=/: not a run directory (no summary.json or metrics.jsonl)"


def test_cli_compare_of_a_device_is_one_line(tmp_path):
    out = run_cli(["compare", "/dev/null"], tmp_path)
    assert out.returncode == 2 and list(tmp_path.iterdir()) == []
    assert one_line(out.stderr) == ("regexp: error: /dev/null: not a directory; give a run dir, a sweep dir "
                                    "or a folder holding them")


def test_cli_compare_of_an_empty_dir_named_as_markup_prints_its_name(tmp_path):
    empty = tmp_path / "[bold]x"
    empty.mkdir()
    out = run_cli(["compare", str(empty)], tmp_path)
    assert out.returncode == 2 and list(empty.iterdir()) == []
    assert one_line(out.stderr) == (f"regexp: error: {empty}: no runs found "
                                    "(no readable summary.json in it or below it)")


def test_cli_help_after_an_override_prints_help_and_writes_nothing(tmp_path):
    out = run_cli(["train", "seed=1", "--help"], tmp_path)
    assert out.returncode == 0 and list(tmp_path.iterdir()) == []
    assert "hydra/launcher" in out.stdout and "regexp train" in out.stdout


@pytest.mark.parametrize("override", ["logger.project='x\n[9/9] job 9: failed'\x1b[31m", "epochs=\x1b[31m1\n2"])
def test_an_error_quoting_a_line_break_or_an_escape_code_stays_one_line(override, capsys, empty_cwd):
    """Bad input that holds a line break or ESC: its one line shows them escaped, prints no line
    of its own (a fake job line) and colours nothing."""
    from conftest import refused

    line = refused(capsys, ["train", override])
    assert "\x1b" not in line and "\n" not in line and "\\x1b" in line and "\\n" in line, line
    assert list(empty_cwd.iterdir()) == []
