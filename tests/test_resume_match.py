"""resume=auto places each job of a sweep by its overrides: in the numbered run dir that holds
a run of the same overrides, whatever the job's number now; a new job in a dir past every
numbered one. Fast: the placement (place_jobs, recorded_runs) and the pre-flight over hostile
sweep dirs; slow: a sweep extended with values that do not come last, with each launcher."""

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli, snapshot

from regexp import cli
from regexp.compose import compose, initialized
from regexp.rundir import ConfigError, Status, Summary, printable, write_summary
from regexp.sweep import place_jobs, plan_lines, plan_overrides, recorded_runs

ADAM = [["optimizer=adam", f"seed={s}"] for s in range(3)]
ADAMW = [["optimizer=adamw", f"seed={s}"] for s in range(3)]
OLD = dict(enumerate(ADAM + ADAMW))  # optimizer=adam,adamw seed=0,1,2 as Hydra numbered its jobs
NEW = [[o, f"seed={s}"] for o in ("optimizer=adam", "optimizer=adamw") for s in range(4)]  # seed=0,1,2,3
MOVED = "resume=auto: run dirs by overrides (job->dir): 3->6 4->3 5->4 6->5"


# ---------------------------------------------------------------- the placement
def test_each_job_goes_to_the_dir_of_its_overrides_and_new_jobs_past_the_highest():
    assert place_jobs(NEW, OLD) == [(0, True), (1, True), (2, True), (6, False),
                                    (3, True), (4, True), (5, True), (7, False)]


def test_overrides_match_by_what_makes_the_run_not_by_spelling_or_order():
    """resume=, Hydra's own keys, the order and `+` do not make a run; numbers by their value."""
    runs = {0: ["seed=1", "+regularizer=dropout", "optimizer.lr=1e-3", "hydra.launcher.n_jobs=2"]}
    job = ["regularizer=dropout", "optimizer.lr=0.001", "seed=1.0", "resume=auto", "hydra/launcher=fused"]
    assert place_jobs([job], runs) == [(0, True)]
    assert place_jobs([["seed=2", "regularizer=dropout", "optimizer.lr=0.001"]], runs) == [(1, False)]


def test_a_job_removed_from_the_sweep_keeps_its_dir_and_no_job_goes_there():
    runs = {0: ["seed=0"], 1: ["seed=1"], 2: ["seed=2"]}
    assert place_jobs([["seed=0"], ["seed=2"]], runs) == [(0, True), (2, True)]
    assert place_jobs([["seed=0"], ["seed=5"]], runs) == [(0, True), (3, False)]  # not dir 1: it holds seed=1


def test_two_dirs_of_the_same_overrides_are_taken_in_number_order_never_shared():
    runs = {0: ["seed=0"], 4: ["seed=0"]}
    assert place_jobs([["seed=0"]], runs) == [(0, True)]  # dir 4 stays as it is
    assert place_jobs([["seed=0"], ["seed=0"], ["seed=0"]], runs) == [(0, True), (4, True), (5, False)]


def test_a_dir_of_unreadable_overrides_takes_no_job_and_new_ones_go_past_it():
    assert place_jobs([["seed=0"], ["seed=1"]], {0: None, 1: ["seed=1"]}) == [(2, False), (1, True)]
    assert place_jobs([["seed=0"]], {}) == [(0, False)]


def test_the_plan_says_which_jobs_moved_and_which_runs_no_job_continues(tmp_path):
    """A command whose overrides match none of the sweep dir's runs trains every job anew beside
    them: one line says so, naming the dirs it leaves, so that a typo is not a silent retrain."""
    assert plan_lines(tmp_path, place_jobs(NEW, OLD), OLD) == [MOVED]
    runs = {0: ["seed=0"], 1: ["seed=1"], 2: None}  # dir 2: unreadable, named on stderr by recorded_runs
    plan = place_jobs([["seed=0", "optimizer.lr=0.1"], ["seed=1", "optimizer.lr=0.1"]], runs)
    assert plan == [(3, False), (4, False)]
    assert plan_lines(tmp_path, plan, runs) == [
        "resume=auto: run dirs by overrides (job->dir): 0->3 1->4",
        f"resume=auto: 2 runs in {tmp_path} (dirs 0-1) match no job of this command and are left as they are: "
        "a job continues only a run whose recorded overrides equal its own"]
    assert plan_lines(tmp_path, place_jobs([["seed=0"]], runs), runs)[-1].startswith(
        f"resume=auto: 1 run in {tmp_path} (dir 1) matches no job of this command and is left as it is")


def test_an_override_value_cannot_start_a_console_line_of_its_own():
    assert printable("logger.project=x\n[9/9] job 9: failed") == "logger.project=x\\n[9/9] job 9: failed"
    assert printable("tag=\x1b[31mred") == "tag=\\x1b[31mred"
    assert printable("seed=1 [bold]é") == "seed=1 [bold]é"  # printable text as typed


def test_recorded_runs_reads_numbered_dirs_only_and_leaves_hostile_ones_as_they_are(tmp_path, capsys):
    """summary.json first, else .hydra/overrides.yaml; garbage in either names its file on
    stderr and holds no run a job could continue; `007`, `-1`, files and Hydra's own records
    are not run dirs; nothing is written."""
    def summary(name: str, overrides) -> None:
        (tmp_path / name).mkdir()
        write_summary(tmp_path / name, Summary(status=Status.COMPLETED, overrides=overrides))

    def file(path: str, text: str) -> None:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)

    summary("0", ["seed=0"])
    file("1/summary.json", "{not json")
    file("1/.hydra/overrides.yaml", "- seed=1\n")  # its summary is garbage: not read instead
    file("2/.hydra/overrides.yaml", "- seed=2\n")  # died before its summary
    file("3/.hydra/overrides.yaml", "seed: [unclosed\n")
    file("4/.hydra/overrides.yaml", "{seed: 4}\n")  # not a list
    (tmp_path / "5").mkdir()  # nothing recorded
    file("6", "a file named like a job")
    file("8/summary.json", json.dumps({"status": "completed", "overrides": "seed=8"}))  # not a list
    summary("007", ["seed=7"])
    summary("-1", ["seed=9"])
    file("multirun.yaml", "hydra: {}\n")
    file(".sweep/plan.json", "{}")
    before = snapshot(tmp_path)

    runs = recorded_runs(tmp_path)
    assert runs == {0: ["seed=0"], 1: None, 2: ["seed=2"], 3: None, 4: None, 5: None, 6: None, 8: None}
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":", 2)[1].strip() for line in err] == [str(tmp_path / p) for p in (
        "1/summary.json", "3/.hydra/overrides.yaml", "4/.hydra/overrides.yaml", "8/summary.json")]
    assert all(line.startswith("regexp: ") and "resume=auto leaves" in line for line in err)
    assert place_jobs([["seed=1"], ["seed=7"], ["seed=2"]], runs) == [(9, False), (10, False), (2, True)]
    assert snapshot(tmp_path) == before
    assert recorded_runs(tmp_path / "none") == {}  # a sweep dir not made yet


# ---------------------------------------------------------------- the plan, carried to every launcher
PLANNED = [(0, True), (6, False)]


def planned_values(hydra_cfg) -> dict[str, str]:
    """plan_overrides' values as Hydra's parser reads them: key -> value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(plan_overrides(PLANNED, hydra_cfg))
    return {o.key_or_group: o.value() for o in parsed}


WORKER = """
import json, pickle, sys
from omegaconf import OmegaConf
pickle.loads(sys.stdin.buffer.read())  # the task function, as a joblib or submitit worker gets it
values = json.loads(sys.argv[1])
for number in (0, 1):
    cfg = OmegaConf.create({"hydra": {"job": {"num": number}, **values}})
    print(cfg.hydra.sweep.subdir, cfg.hydra.output_subdir)
"""


def test_a_worker_process_resolves_each_jobs_planned_dir_and_records(tmp_path):
    """A job composed in a fresh process (joblib's, submitit's) resolves the plan once it has
    unpickled the task function: job 0 continues dir 0 and leaves its .hydra/ as it is, job 1
    starts dir 6 with its records."""
    with initialized():
        hydra_cfg = compose(["seed=0"], with_hydra=True).hydra
    values = planned_values(hydra_cfg)
    assert set(values) == {"hydra.sweep.subdir", "hydra.output_subdir"}
    nested = {"sweep": {"subdir": values["hydra.sweep.subdir"]}, "output_subdir": values["hydra.output_subdir"]}
    out = subprocess.run([sys.executable, "-c", WORKER, json.dumps(nested)], input=pickle.dumps(cli.Job()),
                         capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().splitlines() == ["0 None", "6 .hydra"]


def test_without_hydras_records_the_plan_moves_the_dirs_only():
    with initialized():
        hydra_cfg = compose(["seed=0", "hydra.output_subdir=null"], with_hydra=True).hydra
    assert set(planned_values(hydra_cfg)) == {"hydra.sweep.subdir"}


# ---------------------------------------------------------------- the pre-flight
def recorded_sweep(sweep_dir: Path, runs: dict[str, list[str]]) -> None:
    for name, overrides in runs.items():
        (sweep_dir / name).mkdir(parents=True)
        write_summary(sweep_dir / name, Summary(status=Status.COMPLETED, overrides=overrides))


SMALL = ["dataset.limit=256", "epochs=1", "logger=none"]


def test_the_pre_flight_plans_the_dirs_says_which_jobs_moved_and_touches_nothing(tmp_path, data_root, capsys):
    sweep_dir = tmp_path / "sweep"
    recorded_sweep(sweep_dir, {str(n): [*job, *SMALL] for n, job in OLD.items()})
    recorded_sweep(sweep_dir, {"007": ["optimizer=adam", "seed=3", *SMALL], "-1": ["optimizer=adamw", "seed=3", *SMALL]})
    before = snapshot(sweep_dir)
    out_dir, _, planned = cli.precheck(["optimizer=adam,adamw", "seed=0,1,2,3", *SMALL, "resume=auto",
                                        f"hydra.sweep.dir={sweep_dir}"], multirun=True)
    assert out_dir == str(sweep_dir) and capsys.readouterr().out.splitlines() == [MOVED]
    text = "0 1 2 +6 3 4 5 +7"
    assert planned == [f"hydra.sweep.subdir='${{regexp.planned_run:${{hydra.job.num}},\"{text}\"}}'",
                       f"hydra.output_subdir='${{regexp.planned_records:${{hydra.job.num}},\"{text}\"}}'"]
    assert snapshot(sweep_dir) == before


def test_the_pre_flight_plans_nothing_without_resume_auto_or_with_a_subdir_of_the_users(tmp_path, data_root, capsys):
    """A user-set hydra.sweep.subdir names each job's dir itself: a job whose dir holds a run
    of other overrides refuses the sweep, as before (exit 2 at the CLI)."""
    sweep_dir = tmp_path / "sweep"
    recorded_sweep(sweep_dir, {"j0": ["seed=0", *SMALL], "j1": ["seed=1", *SMALL]})
    before = snapshot(sweep_dir)
    common = [*SMALL, f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=j${hydra.job.num}"]
    with pytest.raises(ConfigError, match=f"resume=auto: {sweep_dir / 'j1'} holds a run of other overrides "
                                          r"\(seed=1 where this job has seed=2\)"):
        cli.precheck(["seed=0,2", "resume=auto", *common], multirun=True)
    assert cli.precheck(["seed=0,1", "resume=auto", *common], multirun=True)[2] == []
    fresh = tmp_path / "fresh"
    assert cli.precheck(["seed=0,1", *SMALL, f"hydra.sweep.dir={fresh}"], multirun=True)[2] == []
    assert capsys.readouterr().out == "" and snapshot(sweep_dir) == before and not fresh.exists()


# ---------------------------------------------------------------- through the CLI, with each launcher
TRAIN = ["dataset.limit=256", "dataset.val_size=256", "epochs=1", "logger=none"]
LAUNCHERS = {"basic": [], "fused": ["hydra/launcher=fused"], "joblib": ["hydra/launcher=joblib"]}


@pytest.fixture(scope="module")
def first_sweep(tmp_path_factory) -> Path:
    """optimizer=adam,adamw seed=0,1,2 trained once (the basic launcher): six run dirs 0-5."""
    from conftest import require_shared_data

    root = tmp_path_factory.mktemp("first")
    out = run_cli(["train", "-m", "optimizer=adam,adamw", "seed=0,1,2", *TRAIN, f"hydra.sweep.dir={root / 'sweep'}"],
                  root, require_shared_data())
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "sweep"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_a_sweep_extended_inside_hydras_order_skips_its_runs_and_trains_only_the_new_jobs(
        first_sweep, tmp_path, data_root, launcher):
    """`seed=0,1,2,3` after `seed=0,1,2`: the adamw jobs' numbers shift (4-6), their runs stay
    in dirs 3-5 and are skipped byte for byte (.hydra/ and train.log too, mtimes too); the two
    seed=3 jobs train in dirs 6 and 7; the console says which jobs moved; the summary lists the
    8 jobs, each with its own run dir."""
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(first_sweep, sweep_dir)
    old = {n: snapshot(sweep_dir / str(n)) for n in range(6)}
    out = run_cli(["train", "-m", *LAUNCHERS[launcher], "optimizer=adam,adamw", "seed=0,1,2,3", *TRAIN, "resume=auto",
                   f"hydra.sweep.dir={sweep_dir}"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines().count(MOVED) == 1
    assert {n: snapshot(sweep_dir / str(n)) for n in range(6)} == old
    for name, optimizer in (("6", "adam"), ("7", "adamw")):
        summary = json.loads((sweep_dir / name / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["run_dir"] == str(sweep_dir / name)
        assert {f"optimizer={optimizer}", "seed=3"} <= set(summary["overrides"])
        assert (sweep_dir / name / ".hydra" / "overrides.yaml").is_file()
    assert sorted(p.name for p in sweep_dir.iterdir() if p.name.isdigit()) == [str(n) for n in range(8)]
    table = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert (table["jobs"], table["statuses"]) == (8, {"completed": 8})
    dirs = [0, 1, 2, 6, 3, 4, 5, 7]
    assert [(r["job"], r["run_dir"]) for r in table["rows"]] == [(str(n), str(sweep_dir / str(d))) for n, d in enumerate(dirs)]
    for row, job in zip(table["rows"], NEW):
        assert set(job) <= set(row["overrides"])
        assert row["test/acc"] == json.loads(Path(row["run_dir"], "summary.json").read_text())["metrics"]["test/acc"]
    assert "run dir" in out.stdout and any(line.startswith("│ 3 ") and line.rstrip().endswith("│ 6       │")
                                           for line in out.stdout.splitlines()), out.stdout[-3000:]


def test_a_one_job_plan_stays_text(tmp_path):
    """A one-job sweep's plan (`0`, or `+3` for a new run dir) reaches the resolvers as text, not
    read as a number (which would drop the `+` and, with it, the new run's .hydra/ records)."""
    from omegaconf import OmegaConf

    from regexp.sweep import plan_overrides, register_plan_resolvers

    register_plan_resolvers()
    for plan, dir_, records in (([(0, True)], "0", None), ([(3, False)], "3", ".hydra")):
        cfg = OmegaConf.create({"job": {"num": 0}, "output_subdir": ".hydra", "sweep": {}})
        for override in plan_overrides(plan, cfg):
            key, value = override.split("=", 1)
            OmegaConf.update(cfg, key.removeprefix("hydra."), value.strip("'").replace("hydra.job.num", "job.num"))
        assert (cfg.sweep.subdir, cfg.output_subdir) == (dir_, records)
