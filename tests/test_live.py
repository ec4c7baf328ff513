"""Findings while a run trains (regexp.live): each new finding is one console line and a
`finding` event in metrics.jsonl and W&B; monitor.on_finding=stop ends the run on a decisive
one as `stopped` (exit 0, records whole, checkpoint saved), a resume with warn continues it
exactly and a resume with stop writes nothing. Fast tests drive the live driver with a fake
Watch; the slow ones train through the CLI with the real rules (regexp.diagnose.Watch)."""

import io
from types import SimpleNamespace

import pytest
from conftest import copy_of, records, run_cli, snapshot
from rich.console import Console

from regexp.diagnose import Finding
from regexp.live import FINDING_RULE, LiveFindings, finding_event
from regexp.rundir import Status, Summary, load_summary, read_metrics
from regexp.tracking import Reporter, Tracker, short_evidence
from regexp.train import Plan, end_on_finding
from regexp.wandb_logger import WandbRun


# ---------------------------------------------------------------- fakes
def finding(rule: str = "loss_flat", step: int = 6, decisive: bool = False, title: str = "Loss flat from the start",
            evidence: dict | None = None) -> Finding:
    return Finding(rule, title, f"{rule} held at step {step}",
                   evidence if evidence is not None else {"metric": "train/loss", "layer": None, "step": step, "values": 2.302},
                   ["raise the learning rate (optimizer.lr)", "check the data"], step=step, decisive=decisive)


class FakeWatch:
    """Trips the findings given for a step when the record of that step is fed, each once."""

    def __init__(self, trips: dict[int, list[Finding]], inactive: list[str] | None = None):
        self.trips, self.inactive, self.fed = trips, inactive or [], []

    def feed(self, record):
        self.fed.append(record)
        return self.trips.pop(record.get("step"), []) if FINDING_RULE not in record else []

    def findings(self):
        return []


class ListSink:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)

    def close(self, exit_code=0):
        pass


def live(trips, stop=False):
    sink, out = ListSink(), io.StringIO()
    reporter = Reporter(Console(file=out, width=300, highlight=False))
    return LiveFindings(FakeWatch(trips), Tracker([sink]), reporter, stop), sink, out


def loop_of(findings: LiveFindings, status: Status = Status.COMPLETED, step: int = 4, max_steps: int | None = None):
    """A loop of 2 epochs of 8 steps, in its first epoch at `step`."""
    plan = Plan([[32]] * 8, list(range(0, 256, 32)), epochs=2, max_steps=max_steps, log_every=2, histogram_every=None,
                checkpoint_every=None, eval_every=1)
    return SimpleNamespace(live=findings, status=status, summary=Summary(), plan=plan,
                           state=SimpleNamespace(step=step, epoch=1 + (step - 1) // 8, window=(step - 1) % 8 + 1))


# ---------------------------------------------------------------- fast: the driver
def test_a_new_finding_is_written_as_a_finding_event_at_its_step():
    findings, sink, _ = live({4: [finding(step=4)]})
    findings.observe({"step": 2, "train/loss": 2.3})
    assert sink.records == []
    findings.observe({"step": 4, "train/loss": 2.3})
    assert sink.records == [{"step": 4, "finding/rule": "loss_flat", "finding/title": "Loss flat from the start",
                             "finding/decisive": False, "finding/message": "loss_flat held at step 4"}]


def test_the_console_line_names_step_finding_evidence_and_what_to_try_first():
    findings, _, out = live({6: [finding(evidence={"metric": "grad/norm", "layer": "fc1", "step": 6,
                                                   "values": {"fc1": 2.7e-12, "ratio": 1.4e-12}})]})
    findings.observe({"step": 6}, label="lr=0.1")
    lines = out.getvalue().splitlines()
    assert lines == ["warning: lr=0.1 · step 6 · Loss flat from the start (grad/norm of fc1: fc1 2.7e-12, ratio 1.4e-12) "
                     "· try first: raise the learning rate (optimizer.lr)"]


def test_a_finding_title_with_markup_is_printed_as_written():
    findings, _, out = live({2: [finding(title="[bold]flat[/bold] loss", evidence={"metric": "[red]x", "values": None})]})
    findings.observe({"step": 2})
    assert "[bold]flat[/bold] loss ([red]x)" in out.getvalue()


def test_a_finding_is_announced_once_and_a_replayed_one_not_at_all():
    findings, sink, out = live({2: [finding(step=2)], 4: [finding("dead", step=4)]})
    findings.replay([{"step": 2}])  # a resume: announced when it was written
    findings.observe({"step": 2})
    findings.observe({"step": 4})
    assert [r["finding/rule"] for r in sink.records] == ["dead"]
    assert out.getvalue().count("warning:") == 1


def test_stop_ends_the_run_on_the_first_decisive_finding_with_ended_by():
    findings, _, out = live({2: [finding("clip", step=2)], 4: [finding("vanishing", step=4, decisive=True, title="Vanishing")]},
                            stop=True)
    loop = loop_of(findings)
    findings.observe({"step": 2})
    end_on_finding(loop)
    assert loop.status == Status.COMPLETED and loop.summary.ended_by is None  # not decisive: the run goes on
    findings.observe({"step": 4})
    end_on_finding(loop)
    assert loop.status == Status.STOPPED
    assert loop.summary.ended_by == {"rule": "vanishing", "title": "Vanishing", "step": 4}
    assert out.getvalue().splitlines()[-1].endswith("monitor.on_finding=stop: the run stops here")


def test_warn_goes_on_after_a_decisive_finding_and_says_stop_would_end_it():
    findings, sink, out = live({4: [finding(step=4, decisive=True)]}, stop=False)
    loop = loop_of(findings)
    findings.observe({"step": 4})
    end_on_finding(loop)
    assert loop.status == Status.COMPLETED and loop.summary.ended_by is None
    assert sink.records[0]["finding/decisive"] is True
    assert out.getvalue().strip().endswith("decisive: monitor.on_finding=stop would end the run here")


def test_a_second_decisive_finding_at_the_stop_does_not_say_what_warn_would_say():
    findings, _, out = live({4: [finding("vanishing", step=4, decisive=True), finding("dead", step=4, decisive=True)]},
                            stop=True)
    findings.observe({"step": 4})
    first, second = out.getvalue().splitlines()
    assert first.endswith("· monitor.on_finding=stop: the run stops here") and second.endswith("· decisive as well")
    assert findings.decisive.rule == "vanishing"


@pytest.mark.parametrize("status", [Status.DIVERGED, Status.EARLY_STOPPED])
def test_a_run_that_ended_otherwise_keeps_its_status_and_no_ended_by(status):
    findings, _, _ = live({4: [finding(step=4, decisive=True)]}, stop=True)
    loop = loop_of(findings, status)
    findings.observe({"step": 4})
    end_on_finding(loop)
    assert loop.status == status and loop.summary.ended_by is None


@pytest.mark.parametrize("step, max_steps", [(16, None), (6, 6)])
def test_a_decisive_finding_where_the_plan_ends_anyway_leaves_the_run_completed(step, max_steps):
    findings, _, _ = live({step: [finding(step=step, decisive=True)]}, stop=True)
    loop = loop_of(findings, step=step, max_steps=max_steps)
    findings.observe({"step": step})
    end_on_finding(loop)
    assert loop.status == Status.COMPLETED and loop.summary.ended_by is None  # it trained every step of its plan


def test_short_evidence_of_each_shape():
    assert short_evidence({"metric": "train/loss", "layer": None, "values": 2.30258}) == "train/loss: 2.303"
    assert short_evidence({"metric": "act/dead", "layer": "act1", "values": [0.9, 1.0, 1.0, 1.0, 0.5]}) == \
        "act/dead of act1: 0.9, 1, 1, 1, ..."
    assert short_evidence({"metric": "nonfinite/where", "values": "forward fc3"}) == "nonfinite/where: forward fc3"
    assert short_evidence({"metric": "grad/global_norm"}) == "grad/global_norm"
    # a 10-layer net's std per layer, nested: its first two layers and its last, on one line
    stds = {f"act{i}": 10.0 ** -i for i in range(1, 11)}
    assert short_evidence({"metric": "act/std", "layer": "act10", "values": {"std": stds, "ratio": 1e-9}}) == \
        "act/std of act10: std act1 0.1, act2 0.01, ..., act10 1e-10, ratio 1e-09"
    assert short_evidence({"metric": "grad/norm", "values": {"fc1": 1e-8, "fc3": 2.0, "ratio": 5e-9}}) == \
        "grad/norm: fc1 1e-08, fc3 2, ratio 5e-09"
    dead = {f"act{i}": i / 10 for i in range(1, 11)}  # the finding names act9: its value is shown
    assert short_evidence({"metric": "act/dead_frac", "layer": "act9", "values": dead}) == \
        "act/dead_frac of act9: act1 0.1, act2 0.2, ..., act9 0.9, act10 1"


# ---------------------------------------------------------------- fast: W&B
class FakeWandbRun:
    def __init__(self, offline: bool):
        self.offline, self.summary, self.logged, self.alerts = offline, {}, [], []

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, record):
        self.logged.append(record)

    def alert(self, **kwargs):
        self.alerts.append(kwargs)


def test_wandb_gets_the_finding_in_its_summary_not_as_a_series_and_no_alert_offline():
    run = FakeWandbRun(offline=True)
    sink = WandbRun(run)
    sink.write({"step": 4, "train/loss": 2.3})
    sink.write(finding_event(finding("vanishing_gradients", step=4, decisive=True)))
    assert run.logged == [{"step": 4, "train/loss": 2.3}]  # no string-valued series
    assert run.summary == {"finding/vanishing_gradients": 4}
    assert run.alerts == []


def test_an_online_wandb_run_alerts_with_the_title_step_and_message():
    import wandb

    run = FakeWandbRun(offline=False)
    WandbRun(run).write(finding_event(finding("loss_flat", step=6)))
    assert run.alerts == [{"title": "Loss flat from the start", "text": "step 6: loss_flat held at step 6",
                           "level": wandb.AlertLevel.WARN}]
    assert run.summary == {"finding/loss_flat": 6}


# ---------------------------------------------------------------- slow: through the CLI, with the real rules
# The 10-layer sigmoid net at a tiny init: its gradients vanish from the first log step
SIGMOID = ["model=deep_mlp", "model.depth=10", "model.activation=sigmoid", "init=normal", "init.std=0.01"]
SMALL = ["logger=none", "dataset.limit=256", "dataset.val_size=256", "batch_size=8", "epochs=8", "monitor.log_every=10",
         "device.deterministic=true"]  # 32 steps an epoch: the decisive rules' 10 log steps over 200 optimizer steps fit
STEPS = 256


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The sigmoid net trained once with on_finding=stop and once with warn; tests copy them."""
    from conftest import require_shared_data

    data_root = require_shared_data()
    root = tmp_path_factory.mktemp("live")
    made = {}
    for name in ("stop", "warn"):
        out = run_cli(["train", *SIGMOID, *SMALL, f"monitor.on_finding={name}", f"hydra.run.dir={root / name}"], root, data_root)
        assert out.returncode == 0, out.stderr[-2000:]
        made[name] = (root / name, out)
    return made




@pytest.mark.slow
def test_a_decisive_finding_with_stop_ends_the_run_at_its_step_as_stopped(trained):
    run_dir, out = trained["stop"]
    summary = load_summary(run_dir)
    ended = summary.ended_by
    assert summary.status == Status.STOPPED and ended["rule"] and ended["title"]
    assert summary.steps == ended["step"] < STEPS  # within the step where it tripped, long before the plan's end
    assert (run_dir / "checkpoint.pt").is_file() and "test/acc" in summary.metrics
    event, = [r for r in read_metrics(run_dir) if r.get(FINDING_RULE) == ended["rule"]]
    assert event["step"] == ended["step"] and event["finding/decisive"] is True
    assert f"step {ended['step']} · {ended['title']}" in out.stdout and "the run stops here" in out.stdout
    assert "regexp · stopped" in out.stdout and "ended_by" in out.stdout  # the panel says what stopped it


@pytest.mark.slow
def test_a_stopped_run_resumed_with_stop_writes_nothing(trained, tmp_path, data_root):
    run_dir = copy_of(trained, "stop", tmp_path)
    before = snapshot(run_dir)
    out = run_cli(["train", f"resume={run_dir}", "monitor.on_finding=stop"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-2000:]
    rule = load_summary(run_dir).ended_by["rule"]
    assert out.stdout.strip().splitlines() == [
        f"{run_dir}: stopped at step {load_summary(run_dir).steps} by a decisive finding ({rule}): the run is finished "
        "and nothing was written; resume it with monitor.on_finding=warn to train it on"]
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_a_stopped_run_resumed_with_warn_ends_as_the_run_trained_with_warn(trained, tmp_path, data_root):
    run_dir = copy_of(trained, "stop", tmp_path)
    stopped_at = load_summary(run_dir).steps
    out = run_cli(["train", f"resume={run_dir}", "monitor.on_finding=warn"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"step {stopped_at} · " not in out.stdout  # its findings were announced once, before the stop
    straight = trained["warn"][0]
    resumed, whole = load_summary(run_dir), load_summary(straight)
    assert resumed.status == whole.status == Status.COMPLETED and resumed.steps == whole.steps == STEPS
    no_perf = lambda m: {k: v for k, v in m.items() if not k.startswith("perf/")}  # noqa: E731
    assert no_perf(resumed.metrics) == no_perf(whole.metrics)
    # the same records, and the evaluation made where it stopped (as a max_steps stop keeps it)
    stop_row = [r for r in records(run_dir) if r.get("step") == stopped_at and "epoch/lr" in r]
    assert [r for r in records(run_dir) if r not in stop_row] == records(straight)
    assert [(f["rule"], f["step"]) for f in resumed.findings] == [(f["rule"], f["step"]) for f in whole.findings]


@pytest.mark.slow
def test_live_final_and_offline_findings_agree(trained, tmp_path, data_root):
    """The same rules at the same steps: the events written as it trained, summary.json's
    findings, and `regexp diagnose` of the run dir (needs helper rules' Watch for steps in findings)."""
    from regexp.diagnose import diagnose

    run_dir = trained["warn"][0]
    live_found = [(r["finding/rule"], r["step"]) for r in read_metrics(run_dir) if FINDING_RULE in r]
    summary = load_summary(run_dir)
    final = [(f["rule"], f["step"]) for f in summary.findings]
    offline = [(f["rule"], f["step"]) for f in diagnose(read_metrics(run_dir), summary)]
    assert live_found and sorted(live_found) == sorted(final) == sorted(offline)
    out = run_cli(["diagnose", str(run_dir)], tmp_path, data_root)
    assert out.returncode == 0 and all(f["title"] in " ".join(out.stdout.split()) for f in summary.findings)


@pytest.mark.slow
def test_monitor_off_says_once_which_rules_do_not_run_and_the_loss_rules_still_do(tmp_path, data_root):
    from regexp.diagnose import Watch

    run_dir = tmp_path / "off"
    out = run_cli(["train", "monitor=off", "monitor.log_every=2", "optimizer=sgd", "optimizer.lr=1e6", "logger=none",
                   "dataset.limit=256", "dataset.val_size=256", "batch_size=32", "epochs=1", f"hydra.run.dir={run_dir}"],
                  tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-2000:]
    inactive = Watch(load_summary(run_dir).config).inactive
    assert inactive
    lines = [line for line in out.stdout.splitlines() if "monitor.per_layer=false" in line]
    assert lines == [f"per-layer metrics are off (monitor.per_layer=false): the rules {', '.join(inactive)} do not run, "
                     "while it trains or at its end; the loss rules do"]
    rules = {r["finding/rule"] for r in read_metrics(run_dir) if FINDING_RULE in r}
    assert rules and not rules & set(inactive)  # a loss rule (the divergence) still found it


@pytest.mark.slow
def test_in_a_fused_group_a_member_stops_on_its_own_finding_and_the_others_train_on(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    # lr=10 kills every unit of act1 within a few steps (dead_network, decisive); lr=1e-3 trains
    out = run_cli(["train", "-m", "hydra/launcher=fused", "optimizer.lr=10,0.001", *SMALL, "monitor.on_finding=stop",
                   f"hydra.sweep.dir={sweep}"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fused: jobs 0-1 train as one group of 2 models" in out.stdout
    hopeless, healthy = load_summary(sweep / "0"), load_summary(sweep / "1")
    assert hopeless.status == Status.STOPPED and hopeless.steps == hopeless.ended_by["step"] < STEPS
    assert healthy.status == Status.COMPLETED and healthy.steps == STEPS and healthy.ended_by is None
    assert f"0 · step {hopeless.ended_by['step']} · {hopeless.ended_by['title']}" in out.stdout
    assert not any(line.startswith("warning: 1 · ") and "stops here" in line for line in out.stdout.splitlines())
    assert [r for r in read_metrics(sweep / "0") if FINDING_RULE in r]


# ---------------------------------------------------------------- hostile input
@pytest.mark.slow
@pytest.mark.parametrize("value", ["halt", "STOP", "''"])
def test_an_unknown_on_finding_is_one_line_exit_2_nothing_written(tmp_path, data_root, value):
    run_dir = tmp_path / "run"
    out = run_cli(["train", f"monitor.on_finding={value}", "logger=none", f"hydra.run.dir={run_dir}"], tmp_path, data_root)
    assert out.returncode == 2
    line, = out.stderr.strip().splitlines()
    assert "monitor.on_finding" in line and "warn" in line and "stop" in line
    assert not run_dir.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_stopped_run_with_a_corrupted_record_is_refused_on_resume_and_nothing_written(trained, tmp_path, data_root):
    run_dir = copy_of(trained, "stop", tmp_path)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write("{not json\n{}\n")
    before = snapshot(run_dir)
    out = run_cli(["train", f"resume={run_dir}", "monitor.on_finding=warn"], tmp_path, data_root)
    assert out.returncode == 1
    line, = out.stderr.strip().splitlines()
    assert "metrics.jsonl" in line
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_a_stopped_run_resumed_with_another_lr_is_refused_and_nothing_written(trained, tmp_path, data_root):
    run_dir = copy_of(trained, "stop", tmp_path)
    before = snapshot(run_dir)
    out = run_cli(["train", f"resume={run_dir}", "monitor.on_finding=warn", "optimizer.lr=0.5"], tmp_path, data_root)
    assert out.returncode == 2
    line, = out.stderr.strip().splitlines()
    assert line.startswith("regexp: error: optimizer.lr=0.5: the run in")
    assert snapshot(run_dir) == before


@pytest.mark.slow
@pytest.mark.parametrize("override,key", [("epochs=2", "epochs=2: the run in"), ("max_steps=100", "max_steps=100: the run in")])
def test_a_stopped_run_resumed_with_a_plan_that_ends_behind_it_is_refused(trained, tmp_path, data_root, override, key):
    """Stopped mid-epoch (epoch 7 of 8) at step 210: epochs=2 would train past the plan's end and
    max_steps=100 would record an end it never had; one line each, nothing written."""
    run_dir = copy_of(trained, "stop", tmp_path)
    before = snapshot(run_dir)
    out = run_cli(["train", f"resume={run_dir}", "monitor.on_finding=warn", override], tmp_path, data_root)
    assert out.returncode == 2, out.stdout[-2000:]
    line, = out.stderr.strip().splitlines()
    assert line.startswith(f"regexp: error: {key} {run_dir}") and "already" in line
    assert snapshot(run_dir) == before
