"""The Python API checks its arguments: a wrong one is a ConfigError naming it, raised before
anything is written; and regexp.run works in two threads at once."""

import json
import threading
from pathlib import Path

import pytest
from conftest import TINY, require_shared_data

import regexp
from regexp.rundir import ConfigError


def healthy_run(run_dir: Path) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "metrics": {"test/acc": 0.5}}))
    return run_dir


@pytest.mark.parametrize("kwargs,line", [
    ({"overrides": None}, "overrides=None: must be a list of non-empty strings"),
    ({"overrides": 5}, "overrides=5: must be a list of non-empty strings"),
    ({"overrides": b"seed=1"}, "overrides=b'seed=1': must be a list of non-empty strings"),
    ({"overrides": "model=cnn"}, "overrides='model=cnn': must be a list of non-empty strings, e.g. ['model=cnn', 'seed=1']"),
    ({"overrides": ["seed=1", 5]}, "overrides=['seed=1', 5]: must be a list of non-empty strings"),
    ({"overrides": [""]}, "overrides=['']: must be a list of non-empty strings"),
    ({"run_dir": 5}, "run_dir=5: must be a directory's path (a non-empty str or os.PathLike)"),
    ({"run_dir": ""}, "run_dir='': must be a directory's path"),
    ({"run_dir": b"runs"}, "run_dir=b'runs': must be a directory's path"),
])
def test_run_refuses_a_wrong_argument_and_writes_nothing(tmp_path, monkeypatch, kwargs, line):
    monkeypatch.chdir(tmp_path)  # run_dir="" would have trained here, among the user's files
    with pytest.raises(ConfigError) as error:
        regexp.run(**{"overrides": ["logger=none"], **kwargs})
    assert str(error.value).startswith(line) and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("run_dir,line", [(5, "run_dir=5: "), ("", "run_dir='': "), (None, "run_dir=None: ")])
def test_load_refuses_a_run_dir_that_is_no_path(run_dir, line):
    with pytest.raises(ConfigError, match=f"^{line}must be a directory's path"):
        regexp.load(run_dir)


@pytest.mark.parametrize("kwargs,line", [
    ({"paths": []}, "paths=[]: must be a non-empty list of run or sweep dirs"),
    ({"paths": "{run}"}, "paths='{run}': must be a non-empty list"),
    ({"paths": [5]}, "paths=5: must be a directory's path"),
    ({"paths": None}, "paths=None: must be a non-empty list"),
    ({"metric": None}, "metric=None: must be a metric name"),
    ({"metric": ""}, "metric='': must be a metric name"),
    ({"by": [5]}, "by=[5]: must be a list of non-empty strings"),
    ({"by": "optimizer"}, "by='optimizer': must be a list of non-empty strings"),
])
def test_compare_refuses_a_wrong_argument(tmp_path, kwargs, line):
    run = str(healthy_run(tmp_path / "run"))
    kwargs = {k: v.format(run=run) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ConfigError) as error:
        regexp.compare(**{"paths": [run], **kwargs})
    assert str(error.value).startswith(line.format(run=run))


def test_compare_takes_path_likes_and_a_tuple(tmp_path):
    run = healthy_run(tmp_path / "run")
    table = regexp.compare((run,), metric="test/acc")
    assert [r["run_dir"] for r in table["runs"]] == [str(run)]


def test_composition_in_several_threads_at_once():
    from regexp.compose import compose_and_validate

    results, errors = {}, []

    def compose(seed: int) -> None:
        try:
            results[seed] = [compose_and_validate([f"seed={seed}"]).seed for _ in range(2)]
        except Exception as e:  # noqa: BLE001 - what the test reports
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=compose, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and results == {seed: [seed, seed] for seed in range(4)}


@pytest.mark.slow
def test_two_runs_in_two_threads_both_finish_each_with_its_own_log(tmp_path):
    data = require_shared_data()
    outcome = {}

    def train(seed: int) -> None:
        try:
            overrides = [*TINY, "logger=none", "device.threads=1", f"seed={seed}", f"dataset.root={data}"]
            outcome[seed] = regexp.run(overrides, run_dir=tmp_path / str(seed)).status
        except BaseException as e:  # noqa: B036 - what the test reports
            outcome[seed] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=train, args=(seed,)) for seed in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert outcome == {0: regexp.Status.COMPLETED, 1: regexp.Status.COMPLETED}
    for seed, other in ((0, 1), (1, 0)):
        log = (tmp_path / str(seed) / "train.log").read_text()
        assert f"run dir {tmp_path / str(seed)}" in log and str(tmp_path / str(other)) not in log
