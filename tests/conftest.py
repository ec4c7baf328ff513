"""Shared fixtures: the real data sets, the real CLI, and a small composed config."""

import contextlib
import copy
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
REGEXP = str(Path(sys.executable).with_name("regexp"))  # the installed console script
MISSING_DATA = "real data not found"  # the skip reasons the terminal summary counts
NO_BROWSER = "chromium not found"
NO_SLURM = "sbatch not found"
LOCAL_SLURM = REPO / "scripts" / "local-slurm"
SLURM_LOCK = Path("/tmp/regexp-slurm.lock")  # one `local-slurm start` at a time, across xdist workers and sessions
SLURM_STARTED = "REGEXP_TEST_SLURM_STARTED"  # env: the file whose presence says this session started the cluster


def data_dirs() -> list[Path]:
    """Where the real data sets are looked for, in order: $REGEXP_DATA_DIR, then ../shared/data."""
    env = os.environ.get("REGEXP_DATA_DIR")
    return [Path(d).resolve() for d in (env, REPO.parent / "shared" / "data") if d]


def find_data(folder: str = "MNIST") -> Path | None:
    """The first data dir holding `folder` in torchvision's layout (`folder/raw`)."""
    return next((d for d in data_dirs() if (d / folder / "raw").is_dir()), None)


SHARED_DATA = find_data() or data_dirs()[0]  # the data dir of MNIST, for tests that link its folders


def require_shared_data(folder: str = "MNIST") -> Path:
    """The data dir holding `folder`, or skip (counted in the run's summary line), but never
    skip in CI, where real-data tests must run."""
    found = find_data(folder)
    if found is not None:
        return found
    looked = ", ".join(str(d) for d in data_dirs())
    if os.environ.get("CI") == "true":
        pytest.fail(f"real data missing: {folder}/raw in {looked} (CI=true: real-data tests may not skip)")
    pytest.skip(f"{MISSING_DATA}: {folder}/raw in {looked}")


def pytest_terminal_summary(terminalreporter):
    """One line when real-data tests were skipped, so a run without the data does not look green."""
    reasons = [r.longrepr[2] for r in terminalreporter.stats.get("skipped", []) if isinstance(r.longrepr, tuple)]
    missing = [reason.split(f"{MISSING_DATA}: ", 1)[1] for reason in reasons if MISSING_DATA in reason]
    if missing:
        folders = ", ".join(sorted({m.split("/raw in ")[0] for m in missing}))
        looked = ", ".join(str(d) for d in data_dirs())
        terminalreporter.write_line(
            f"real data: {len(missing)} test{'s' * (len(missing) != 1)} skipped: no {folders} in {looked} "
            "(set REGEXP_DATA_DIR to a folder holding MNIST/raw and FashionMNIST/raw)", yellow=True, bold=True)
    browser = sum(NO_BROWSER in reason for reason in reasons)
    if browser:
        terminalreporter.write_line(f"browser: {browser} test{'s' * (browser != 1)} skipped: {NO_BROWSER} on PATH "
                                    "(apt-get install chromium)", yellow=True, bold=True)
    slurm = sum(NO_SLURM in reason for reason in reasons)
    if slurm:
        terminalreporter.write_line(f"slurm: {slurm} test{'s' * (slurm != 1)} skipped: {NO_SLURM} "
                                    "(apt-get install slurm-wlm munge)", yellow=True, bold=True)


def require_chromium() -> str:
    """The headless browser (Debian's chromium), or skip (counted in the run's summary line),
    but never skip in CI, where .ci/run installs it."""
    import shutil

    found = shutil.which("chromium")
    if found is not None:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("chromium missing on PATH (CI=true: browser tests may not skip; .ci/run installs it)")
    pytest.skip(f"{NO_BROWSER} on PATH")


def pytest_configure(config):
    """The controller (xdist's, or the one process of `-n 0`) names the file by which a worker's
    local_slurm says that it started the cluster; the workers inherit it in their environment."""
    if not hasattr(config, "workerinput"):
        import tempfile

        os.environ[SLURM_STARTED] = str(Path(tempfile.gettempdir()) / f"regexp-slurm-started-by-{os.getpid()}")


def pytest_sessionfinish(session):
    """The cluster this session started stops once, from the controller, after every worker's last
    test; one that was up before the session (or another session started) stays up."""
    started = Path(os.environ.get(SLURM_STARTED, ""))
    if hasattr(session.config, "workerinput") or not started.name or not started.is_file():
        return
    started.unlink()
    with slurm_lock():
        subprocess.run(as_root([str(LOCAL_SLURM), "stop"]), capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def local_slurm() -> None:
    """The machine's one-node SLURM cluster, answering (scripts/local-slurm start: at once when
    it is up already). Without sbatch: skip (counted in the run's summary line), but never in
    CI, where .ci/run installs it."""
    import shutil

    if shutil.which("sbatch") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("sbatch missing on PATH (CI=true: slurm tests may not skip; .ci/run installs slurm-wlm munge)")
        pytest.skip(f"{NO_SLURM} on PATH")
    with slurm_lock():
        start = subprocess.run(as_root([str(LOCAL_SLURM), "start"]), capture_output=True, text=True, timeout=120)
    if start.returncode != 0:
        pytest.fail(f"scripts/local-slurm start failed: {start.stderr.strip() or start.stdout.strip()}")
    if start.stdout.startswith("local-slurm: up"):  # not "a cluster already answers": this session's to stop
        Path(os.environ[SLURM_STARTED]).touch()


@contextlib.contextmanager
def slurm_lock() -> Iterator[None]:
    import fcntl

    with SLURM_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released as the file closes
        yield


def as_root(command: list[str]) -> list[str]:
    """The cluster's daemons run as root: through sudo (no prompt) where the tests do not."""
    return command if os.geteuid() == 0 else ["sudo", "-n", *command]


@pytest.fixture
def data_root() -> Path:
    return require_shared_data()


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """No W&B, decoded-data caches in a temp dir (never beside the shared data), and the real
    data sets where the tests found them ($REGEXP_DATA_DIR, else ../shared/data): a command a
    test runs finds them as a user's would, whichever way the suite was started."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("REGEXP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "regexp-cache"))
    found = find_data()
    if found is not None:
        monkeypatch.setenv("REGEXP_DATA_DIR", str(found))


# Small and fast: a few hundred real samples, a few optimizer steps.
TINY = ["dataset.limit=256", "dataset.val_size=256", "batch_size=32", "epochs=1", "max_steps=4", "monitor.log_every=2"]


def run_cli(args: list[str], cwd: Path, data_root: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed `regexp` as a user would, from `cwd`."""
    env = dict(os.environ, COLUMNS="200")
    if data_root is not None:
        env["REGEXP_DATA_DIR"] = str(data_root)
    return subprocess.run([REGEXP, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def answer_sigint() -> None:
    """In a child about to run a command that a test signals: SIGINT as a terminal gives it
    (pytest itself may run with SIGINT ignored, `nohup pytest &`, which the child would inherit)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def signal_once_logged(command: list[str], cwd: Path, env: dict, metrics: Path, signum: int) -> tuple[int, str, str]:
    """Start `command`, send it `signum` once `metrics` holds its first line, and wait for it:
    (exit code, stdout, stderr)."""
    import time

    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=answer_sigint)
    try:
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert process.poll() is None and time.monotonic() < deadline, f"{metrics} never got a line"
            time.sleep(0.05)
        process.send_signal(signum)
        out, err = process.communicate(timeout=300)
    finally:
        process.kill()
    return process.returncode, out, err


def wait_for(condition, what: str, process: "subprocess.Popen | None" = None, timeout: float = 300) -> None:
    """Poll `condition` until it holds: a test's failure when `process` ends first or time runs out."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert process is None or process.poll() is None, f"the command ended before {what}"
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.2)


def submitted_jobs(sweep_dir: Path) -> list[str]:
    """The ids of a sweep's submitit jobs, in submission order, from its .submitit/ folders:
    SLURM's array tasks (41_0, 41_1, not the array's own folder 41), or local jobs' process ids."""
    names = [p.name for p in (sweep_dir / ".submitit").iterdir() if p.name[0].isdigit()]
    tasks = [n for n in names if "_" in n] or names
    return sorted(tasks, key=lambda n: tuple(int(part) for part in n.split("_")))


def refused(capsys, args: list[str]) -> str:
    """`regexp ARGS` in this process: it must exit 2; its one line on stderr, nothing on stdout."""
    import pytest

    from regexp import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    return err.strip()


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch) -> Path:
    """An empty working directory: whatever a command writes by default lands here."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `root` (.hydra/ included): its bytes and mtime, what must stay as it was."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def copy_of(made: dict, name: str, tmp_path: Path) -> Path:
    """A copy (mtimes too) of the run dir a module fixture trained under `name` (made[name][0])."""
    import shutil

    run_dir = tmp_path / name
    shutil.copytree(made[name][0], run_dir)
    return run_dir


def assert_no_nonfinite_numbers(path: Path) -> None:
    """No NaN or Infinity number in a JSON-lines file (a finding's title may name them in words)."""
    import pytest

    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=lambda constant: pytest.fail(f"{constant} in {path.name}: {line}"))


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing fields, which differ between any two runs."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "epoch/samples_per_s"} for r in rows]


def summaries(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("summary.json"))]


def compose_train(overrides: list[str]):
    """The real config tree composed with `overrides` (as `regexp train` would); a copy, so a test
    may change it."""
    return copy.deepcopy(_composed(tuple(overrides)))


@functools.cache  # a composition costs ~0.5 s of CPU and several tests compose the same overrides
def _composed(overrides: tuple[str, ...]):
    from hydra import compose, initialize_config_dir

    from regexp.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="train"):
        return compose(config_name="train", overrides=list(overrides))
