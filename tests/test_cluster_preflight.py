"""A SLURM launcher's request is checked before Hydra writes anything (issue 21): no SLURM on
this machine, an unknown partition, a request no node can hold, or one that `sbatch --test-only`
refuses is one line naming the key. Fast tests run regexp.cluster against fake `sinfo` and
`sbatch` scripts on PATH; the slow ones run the CLI against the machine's one-node cluster."""

import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, TINY, run_cli
from omegaconf import OmegaConf

from regexp.cluster import check_request, gpu_count, sbatch_options
from regexp.rundir import ConfigError, RunError

PRESET = REPO / "conf" / "hydra" / "launcher" / "submitit_slurm.yaml"
DEBUG = "debug*|2|21694|(null)|1"  # sinfo -h -o '%P|%c|%m|%G|%D' of the machine's one-node cluster
GPU_NODES = ["cpu*|64|257000|(null)|10", "gpu|32|256000|gpu:a100:4(S:0-1)|2", "gpu|64|512000|gpu:a100:8|1"]
ACCEPTED = "sbatch: Job 17 to start at 2026-12-07T14:05:02 using 1 processors on nodes n1 in partition gpu"


def hydra_node(choice: str = "submitit_slurm", **changes):
    """`cfg.hydra` of a sweep with the submitit_slurm preset, its keys changed by `changes`."""
    launcher = OmegaConf.merge(OmegaConf.load(PRESET), changes)
    root = OmegaConf.create({"hydra": {"launcher": launcher, "job": {"name": "train"}, "sweep": {"dir": "sweep"},
                                       "runtime": {"choices": {"hydra/launcher": choice}}}})
    return root.hydra


class FakeSlurm:
    """`sinfo` and `sbatch` scripts alone on PATH; sbatch writes its arguments to `calls`."""

    def __init__(self, bin_dir: Path):
        self.bin_dir, self.calls = bin_dir, bin_dir / "sbatch.calls"

    def tool(self, name: str, body: str) -> None:
        (self.bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (self.bin_dir / name).chmod(0o755)

    def nodes(self, *lines: str) -> None:
        self.tool("sinfo", f"printf '%s\\n' {' '.join(map(shlex.quote, lines))}")

    def sbatch(self, answer: str = ACCEPTED, code: int = 0) -> None:
        self.tool("sbatch", f"printf '%s\\n' \"$@\" >> {self.calls}\n"
                            f"printf '%s\\n' {shlex.quote(answer)} >&2\nexit {code}")

    def arguments(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []


@pytest.fixture
def slurm(tmp_path, monkeypatch) -> FakeSlurm:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))  # the fakes only: a real SLURM never answers these tests
    fake = FakeSlurm(bin_dir)
    fake.nodes(DEBUG)
    fake.sbatch()
    return fake


def refusal(hydra_cfg, error=ConfigError) -> str:
    with pytest.raises(error) as refused:
        check_request(hydra_cfg)
    assert "\n" not in str(refused.value)
    return str(refused.value)


# ---------------------------------------------------------------- no SLURM here
@pytest.mark.parametrize("missing", ["sbatch", "sinfo"])
def test_a_machine_without_slurm_is_one_line_naming_the_launcher(slurm, missing):
    (slurm.bin_dir / missing).unlink()
    assert refusal(hydra_node()) == (
        f"hydra/launcher=submitit_slurm: {missing} not found on PATH: this machine is not a SLURM submit host; "
        "run the sweep there, or use hydra/launcher=submitit_local / joblib / fused")


@pytest.mark.parametrize("target", ["hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
                                    "hydra_plugins.regexp_fused_launcher.fused_launcher.FusedSlurmLauncher"])
def test_every_slurm_launcher_is_checked(slurm, target):
    (slurm.bin_dir / "sbatch").unlink()
    assert "sbatch not found on PATH" in refusal(hydra_node("fused_slurm", _target_=target, max_models=4))


@pytest.mark.parametrize("target", ["hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
                                    "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
                                    "hydra_plugins.regexp_fused_launcher.fused_launcher.FusedLauncher"])
def test_other_launchers_ask_no_cluster(slurm, target):
    (slurm.bin_dir / "sbatch").unlink()
    check_request(hydra_node(_target_=target))
    check_request(OmegaConf.create({"launcher": None}))


# ---------------------------------------------------------------- partitions
def test_an_unknown_partition_names_the_partitions_there_are(slurm):
    slurm.nodes(*GPU_NODES)
    assert refusal(hydra_node(partition="gpus")) == (
        "hydra.launcher.partition=gpus: no partition gpus on this cluster; its partitions: cpu (the default), gpu")
    assert refusal(hydra_node(partition="")) == (
        "hydra.launcher.partition=: no partition '' on this cluster; its partitions: cpu (the default), gpu")
    assert slurm.arguments() == []  # sbatch was not asked


def test_a_null_partition_is_the_default_one(slurm):
    slurm.nodes(*GPU_NODES)  # the default, cpu, has no GPUs
    assert refusal(hydra_node()).startswith("hydra.launcher.gpus_per_node=1: partition cpu's nodes have no GPUs")
    check_request(hydra_node(partition="gpu"))


# ---------------------------------------------------------------- what a node holds
def test_the_preset_on_a_gpu_less_cluster_names_gpus_per_node_first(slurm):
    assert refusal(hydra_node()) == ("hydra.launcher.gpus_per_node=1: partition debug's nodes have no GPUs; "
                                     "set hydra.launcher.gpus_per_node=0")
    assert slurm.arguments() == []


@pytest.mark.parametrize("changes, line", [
    ({"gpus_per_node": 0}, "hydra.launcher.cpus_per_task=8: partition debug's nodes have 2 CPUs; "
                           "set hydra.launcher.cpus_per_task to 2 or less"),
    ({"gpus_per_node": 0, "cpus_per_task": 2}, "hydra.launcher.mem_gb=32: partition debug's nodes have 21694 MB; "
                                               "set hydra.launcher.mem_gb to 21 or less"),
    ({"gpus_per_node": 0, "cpus_per_task": 1, "tasks_per_node": 2, "mem_gb": 8, "nodes": 3},
     "hydra.launcher.nodes=3: partition debug has 1 node; set hydra.launcher.nodes to 1 or less"),
    ({"gpus_per_node": 0, "cpus_per_task": 1, "tasks_per_node": 3},
     "hydra.launcher.tasks_per_node=3: partition debug's nodes have 2 CPUs; set hydra.launcher.tasks_per_node to 2 "
     "or less"),
    ({"gpus_per_node": 0, "cpus_per_task": 2, "tasks_per_node": 2},
     "hydra.launcher.cpus_per_task=2: partition debug's nodes have 2 CPUs; set hydra.launcher.cpus_per_task to 1 "
     "or less"),
    ({"gpus_per_node": None, "gpus_per_task": 1}, "hydra.launcher.gpus_per_task=1: partition debug's nodes have no "
                                                  "GPUs; set hydra.launcher.gpus_per_task=null"),
    ({"gpus_per_node": None, "gres": "gpu:a100:2"}, "hydra.launcher.gres=gpu:a100:2: partition debug's nodes have no "
                                                    "GPUs; set hydra.launcher.gres=null"),
], ids=["cpus", "memory", "nodes", "tasks", "cpus of tasks", "gpus a task", "gres"])
def test_a_request_no_node_holds_names_the_key_and_what_fits(slurm, changes, line):
    assert refusal(hydra_node(**changes)) == line
    assert slurm.arguments() == []


@pytest.mark.parametrize("changes, line", [
    ({"gpus_per_node": 16}, "hydra.launcher.gpus_per_node=16: partition gpu's nodes have at most 8 GPUs; "
                            "set hydra.launcher.gpus_per_node to 8 or less"),
    ({"gpus_per_node": 8, "cpus_per_task": 96}, "hydra.launcher.cpus_per_task=96: partition gpu's nodes have 64 CPUs; "
                                                "set hydra.launcher.cpus_per_task to 64 or less"),
    ({"gpus_per_node": 4, "mem_gb": 600}, "hydra.launcher.mem_gb=600: partition gpu's nodes have at most 512000 MB; "
                                          "set hydra.launcher.mem_gb to 500 or less"),
    ({"gpus_per_node": 8, "nodes": 2}, "hydra.launcher.nodes=2: partition gpu has 1 node with room for the rest of "
                                       "this request; set hydra.launcher.nodes to 1 or less"),
    ({"gpus_per_node": None, "gpus_per_task": 3, "tasks_per_node": 4},
     "hydra.launcher.gpus_per_task=3: partition gpu's nodes have at most 8 GPUs; set hydra.launcher.gpus_per_task to "
     "2 or less"),
    ({"gpus_per_node": None, "gres": "gpu:a100:16"}, "hydra.launcher.gres=gpu:a100:16: partition gpu's nodes have at "
                                                     "most 8 GPUs; set hydra.launcher.gres to gpu:8 or less"),
    ({"gpus_per_node": 8, "cpus_per_task": None, "cpus_per_gpu": 16},
     "hydra.launcher.cpus_per_gpu=16: partition gpu's nodes have 64 CPUs; set hydra.launcher.cpus_per_gpu to 8 or "
     "less"),
], ids=["gpus", "cpus of the nodes with the gpus", "memory", "nodes", "gpus of tasks", "gres", "cpus a gpu"])
def test_of_several_node_kinds_the_line_says_what_the_largest_holds(slurm, changes, line):
    slurm.nodes(*GPU_NODES)
    assert refusal(hydra_node(partition="gpu", **changes)) == line


@pytest.mark.parametrize("changes", [{"gpus_per_node": 8, "cpus_per_task": 64, "mem_gb": 400},
                                     {"gpus_per_node": 4, "nodes": 3}, {"gpus_per_node": 1, "mem_gb": 250}],
                         ids=["the big node", "three nodes", "either"])
def test_a_request_fits_where_any_node_of_the_partition_holds_it(slurm, changes):
    slurm.nodes(*GPU_NODES)
    check_request(hydra_node(partition="gpu", **changes))
    assert "--test-only" in slurm.arguments()


def test_a_request_fits_where_any_of_its_partitions_holds_it(slurm):
    slurm.nodes(*GPU_NODES)
    check_request(hydra_node(partition="cpu,gpu"))
    assert refusal(hydra_node(partition="cpu,gpu", gpus_per_node=9)).startswith(
        "hydra.launcher.gpus_per_node=9: partition cpu's nodes have no GPUs")


def test_amounts_sinfo_does_not_give_are_not_held_against_a_request(slurm):
    slurm.nodes("odd*|n/a|?|(null)|1", "a line that is no node line")
    check_request(hydra_node(gpus_per_node=0))
    assert "--test-only" in slurm.arguments()


def test_where_sinfo_gives_no_partitions_sbatch_decides(slurm):
    slurm.nodes("")
    check_request(hydra_node(partition="gpu"))
    assert "--partition=gpu" in slurm.arguments()


@pytest.mark.parametrize("gres, count", [("(null)", 0), ("gpu:4", 4), ("gpu:a100:4(S:0-1)", 4), ("gpu", 1),
                                         ("gpu:a100:2,gpu:v100:2", 4), ("gpu:a100:2(S:0,1),mps:200", 2),
                                         ("mps:100", 0), (None, 0)])
def test_gpus_are_counted_from_any_gres_text(gres, count):
    assert gpu_count(gres) == count


# ---------------------------------------------------------------- sbatch --test-only
FITS = {"gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 1}


def test_a_fitting_request_goes_through_sbatch_test_only_with_submitits_options(slurm):
    check_request(hydra_node(**FITS, qos="high", additional_parameters={"time": 10, "mail_type": "END", "hold": True}))
    assert slurm.arguments() == [
        "--test-only", "--wckey=submitit", "--job-name=train", "--time=10", "--nodes=1", "--ntasks-per-node=1",
        "--cpus-per-task=1", "--gpus-per-node=0", "--mem=1GB", "--qos=high", "--mail-type=END", "--hold",
        "--wrap", "true"]


def test_the_options_are_those_submitit_writes(tmp_path, slurm):
    """The sbatch options of the preset as submitit's own sbatch script has them (less what
    only a real submission needs: its files, its signal)."""
    slurm_module = pytest.importorskip("submitit.slurm.slurm")
    launcher = hydra_node(partition="gpu", exclude="n3", additional_parameters={"mail_type": "END"}).launcher
    parameters = {"job_name": "train", "time": launcher.timeout_min, "nodes": launcher.nodes,
                  "ntasks_per_node": launcher.tasks_per_node, "cpus_per_task": launcher.cpus_per_task,
                  "gpus_per_node": launcher.gpus_per_node, "mem": slurm_module._convert_mem(launcher.mem_gb),
                  "partition": "gpu", "exclude": "n3", "additional_parameters": {"mail_type": "END"}}
    script = slurm_module._make_sbatch_string(command="true", folder=tmp_path, **parameters)
    theirs = {line.split()[1] for line in script.splitlines() if line.startswith("#SBATCH")}
    theirs = {flag for flag in theirs if not flag.startswith(("--output", "--error", "--open-mode", "--signal"))}
    ours = {f"--{option}={value}" for option, (_, _, value) in sbatch_options(launcher).items()}
    assert ours == theirs


@pytest.mark.parametrize("changes, answer, line", [
    ({"qos": "nope"}, "sbatch: error: Invalid qos specification",
     "hydra.launcher.qos=nope: the cluster refuses this request: sbatch: error: Invalid qos specification"),
    ({"account": "nope"}, "sbatch: error: Batch job submission failed: Invalid account or account/partition "
                          "combination specified",
     "hydra.launcher.account=nope: the cluster refuses this request: sbatch: error: Batch job submission failed: "
     "Invalid account or account/partition combination specified"),
    ({"constraint": "h100"}, "allocation failure: Invalid feature specification",
     "hydra.launcher.constraint=h100: the cluster refuses this request: allocation failure: Invalid feature "
     "specification"),
    ({"timeout_min": 99999}, "sbatch: error: Requested time limit is invalid (missing or exceeds some limit)",
     "hydra.launcher.timeout_min=99999: the cluster refuses this request: sbatch: error: Requested time limit is "
     "invalid (missing or exceeds some limit)"),
    ({"additional_parameters": {"mail_type": "BOGUS"}}, "sbatch: error: Invalid --mail-type specification",
     "hydra.launcher.additional_parameters.mail_type=BOGUS: the cluster refuses this request: sbatch: error: Invalid "
     "--mail-type specification"),
    ({"mem_per_cpu": "4G"}, "sbatch: warning: something\nsbatch: fatal: --mem, --mem-per-cpu, and --mem-per-gpu are "
                            "mutually exclusive.",
     "hydra.launcher.mem_gb=1: the cluster refuses this request: sbatch: fatal: --mem, --mem-per-cpu, and "
     "--mem-per-gpu are mutually exclusive."),
    ({}, "allocation failure: Requested node configuration is not available",
     "hydra.launcher: the cluster refuses this request: allocation failure: Requested node configuration is not "
     "available"),
    ({"additional_parameters": {"bogus_opt": 1}}, "sbatch: unrecognized option '--bogus-opt=1'\nTry \"sbatch --help\" "
                                                  "for more information",
     "hydra.launcher.additional_parameters.bogus_opt=1: the cluster refuses this request: sbatch: unrecognized option "
     "'--bogus-opt=1'"),
], ids=["qos", "account", "constraint", "time", "additional parameter", "option named", "no key", "unknown option"])
def test_what_sbatch_refuses_is_its_own_line_under_the_key_it_names(slurm, changes, answer, line):
    slurm.sbatch(answer, code=1)
    assert refusal(hydra_node(**{**FITS, **changes})) == line


# ---------------------------------------------------------------- what no cluster is asked about
@pytest.mark.parametrize("choice", ["submitit_slurm", "submitit_local"])
@pytest.mark.parametrize("changes, line", [
    ({"timeout_min": 0}, "hydra.launcher.timeout_min=0: must be an integer >= 1 (a job's time limit, minutes)"),
    ({"timeout_min": -5}, "hydra.launcher.timeout_min=-5: must be an integer >= 1 (a job's time limit, minutes)"),
    ({"submitit_folder": "/proc/nope/%j"}, "hydra.launcher.submitit_folder=/proc/nope/%j: output directory cannot be "
                                           "written: /proc: No such file or directory"),
])
def test_a_submitit_setting_no_cluster_checks_is_refused_first(slurm, choice, changes, line):
    hydra_cfg = hydra_node(choice, **{**FITS, **changes})
    if choice == "submitit_local":
        hydra_cfg.launcher._target_ = "hydra_plugins.regexp_fused_launcher._submitit_jobs.LocalLauncher"
    assert refusal(hydra_cfg) == line
    assert slurm.arguments() == []  # before any question to the cluster


@pytest.mark.parametrize("changes, line", [
    ({"nodes": 0}, "hydra.launcher.nodes=0: must be an integer >= 1"),
    ({"nodes": -1}, "hydra.launcher.nodes=-1: must be an integer >= 1"),
    ({"tasks_per_node": 0}, "hydra.launcher.tasks_per_node=0: must be an integer >= 1"),
    ({"signal_delay_s": -10}, "hydra.launcher.signal_delay_s=-10: must be from 0 to less than the time limit (14400 s: "
                              "hydra.launcher.timeout_min=240): the warning comes this long before the limit"),
    ({"signal_delay_s": 300, "timeout_min": 1}, "hydra.launcher.signal_delay_s=300: must be from 0 to less than the time "
                                                "limit (60 s: hydra.launcher.timeout_min=1): the warning comes this long "
                                                "before the limit"),
], ids=["no node", "negative nodes", "no task", "negative delay", "delay past the limit"])
def test_what_sbatch_test_only_takes_but_no_job_can_run_is_refused(slurm, changes, line):
    assert refusal(hydra_node(**{**FITS, **changes})) == line
    assert slurm.arguments() == []


# ---------------------------------------------------------------- a cluster that does not answer
@pytest.mark.parametrize("tool", ["sinfo", "sbatch"])
def test_a_cluster_that_does_not_answer_in_time_is_one_line(slurm, monkeypatch, tool):
    monkeypatch.setattr("regexp.cluster.ANSWER_TIMEOUT_S", 0.5)
    slurm.tool(tool, "exec /bin/sleep 30")
    assert refusal(hydra_node(**FITS), RunError) == (
        f"hydra/launcher=submitit_slurm: the cluster did not answer `{tool}` within 0.5 s; is its controller up "
        "(scontrol ping)? Try again later")


def test_a_failing_sinfo_is_one_line(slurm):
    slurm.tool("sinfo", "echo 'slurm_load_partitions: Unable to contact slurm controller (connect failure)' >&2\n"
                        "exit 1")
    assert refusal(hydra_node(), RunError) == ("hydra/launcher=submitit_slurm: sinfo failed: slurm_load_partitions: "
                                               "Unable to contact slurm controller (connect failure)")


# ---------------------------------------------------------------- the CLI's pre-flight
@pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/submitit_slurm' is validated:UserWarning")  # the preset's name
def test_the_pre_flight_checks_a_sweeps_request_once_and_writes_nothing(slurm, tmp_path, monkeypatch):
    from regexp.cli import precheck

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(ConfigError, match="^hydra.launcher.gpus_per_node=1: partition debug's nodes have no GPUs"):
        precheck(["seed=0,1,2", "hydra/launcher=submitit_slurm"], multirun=True)
    slurm.tool("sinfo", f"echo called >> {tmp_path / 'sinfo.calls'}\necho '{DEBUG}'")
    precheck(["seed=0,1,2", "hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=0",
              "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"], multirun=True)
    assert (tmp_path / "sinfo.calls").read_text() == "called\n"  # once for the three jobs
    assert slurm.arguments().count("--test-only") == 1
    assert list(cwd.iterdir()) == []
    precheck(["hydra/launcher=submitit_slurm"], multirun=False)  # one run: Hydra uses no launcher


# ---------------------------------------------------------------- the machine's cluster, through the CLI
def local_cluster() -> list[list[str]]:
    """This machine's cluster (the local_slurm fixture starts it) as `sinfo -h -o '%P|%G'`
    gives it: partition, gres."""
    out = subprocess.run(["sinfo", "-h", "-o", "%P|%G"], capture_output=True, text=True, timeout=20, check=True)
    return [line.split("|") for line in out.stdout.split()]


def assert_refused(out, line: str, cwd: Path) -> None:
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [f"regexp: error: {line}"] and out.stdout == ""
    assert list(cwd.iterdir()) == []  # no sweep dir, no multirun.yaml


@pytest.mark.slow
@pytest.mark.slurm
def test_cli_the_preset_on_the_gpu_less_local_cluster_is_refused_writing_nothing(tmp_path, data_root, local_slurm):
    default, gres = next((name.rstrip("*"), gres) for name, gres in local_cluster() if name.endswith("*"))
    if gpu_count(gres):
        pytest.skip(f"partition {default} of this machine's cluster has GPUs")
    out = run_cli(["train", "-m", "hydra/launcher=submitit_slurm", "seed=0,1", *TINY], tmp_path, data_root)
    assert_refused(out, f"hydra.launcher.gpus_per_node=1: partition {default}'s nodes have no GPUs; "
                        "set hydra.launcher.gpus_per_node=0", tmp_path)


@pytest.mark.slow
@pytest.mark.slurm
def test_cli_an_unknown_partition_is_refused_writing_nothing(tmp_path, data_root, local_slurm):
    out = run_cli(["train", "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=no_such_partition",
                   "seed=0,1", *TINY], tmp_path, data_root)
    assert out.returncode == 2 and out.stderr.startswith(
        "regexp: error: hydra.launcher.partition=no_such_partition: no partition no_such_partition on this cluster; "
        "its partitions: "), out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/submitit_slurm' is validated:UserWarning")
def test_a_request_the_local_cluster_holds_passes_the_pre_flight(tmp_path, monkeypatch, local_slurm):
    from regexp.cli import precheck

    monkeypatch.chdir(tmp_path)
    out_dir, _, _ = precheck(["seed=0,1", "hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=0",
                              "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
                              "hydra.launcher.timeout_min=5"], multirun=True)
    assert out_dir and list(tmp_path.iterdir()) == []
