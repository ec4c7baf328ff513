"""The incremental diagnosis rules on crafted record lists (no training): the step at which each
rule trips, that one spike makes no finding, that live (one record at a time) and offline
(`diagnose`) give the same findings at the same steps, that finding events are ignored, that
findings are ranked under their cause and never give opposite advice, and hostile records."""

import json
import math
import random
import statistics
from dataclasses import asdict

import pytest
from conftest import run_cli

from regexp import diagnose as rules
from regexp.diagnose import Watch, WindowMedian, diagnose
from regexp.rundir import Summary

LAYERS = ("fc1", "fc2", "fc3")


@pytest.fixture(autouse=True)
def log_steps_only(monkeypatch):
    """The crafted runs log every optimizer step and are short: their decisive rules are judged on
    log steps alone (DECISIVE_SPAN, the optimizer steps a decisive sign must also span, has a test
    of its own)."""
    monkeypatch.setattr(rules, "DECISIVE_SPAN", 0)


@pytest.mark.parametrize("rule,metrics", [("no_progress", {}), ("vanishing_gradients", {"grad/norm/fc1": 1e-9})])
def test_a_decisive_sign_must_also_span_its_optimizer_steps(monkeypatch, rule, metrics):
    """At monitor.log_every=1 the patience of 10 log steps is 10 steps: a decisive rule waits until its
    sign has held over DECISIVE_SPAN optimizer steps too; at log_every=50 the 10 log steps span more."""
    monkeypatch.setattr(rules, "DECISIVE_SPAN", 200)
    every_step = diagnose([log_step(s, loss=2.3, metrics=metrics) for s in range(1, 260)], Summary())
    assert {f["rule"]: f["step"] for f in every_step}[rule] == 201
    every_50 = diagnose([log_step(s, loss=2.3, metrics=metrics) for s in range(50, 1000, 50)], Summary())
    assert {f["rule"]: f["step"] for f in every_50}[rule] == 500
    fell = diagnose([log_step(s, loss=2.3 if s < 100 else 2.0, metrics=metrics) for s in range(1, 260)], Summary())
    assert "no_progress" not in {f["rule"] for f in fell}  # a loss that fell by step 100 made progress


def log_step(step: int, loss: float | None = None, metrics: dict | None = None) -> dict:
    """A log step as train.py writes it: a falling loss and healthy per-layer metrics, unless
    `loss` and `metrics` say otherwise."""
    record = {"step": step, "epoch": 1, "train/loss": 2.3 / step if loss is None else loss, "train/acc": 0.5,
              "opt/lr": 1e-3, "perf/samples_per_s": 1000.0, "perf/step_ms": 1.0,
              "grad/global_norm": 1.0 + 0.1 * (step % 3), "grad/global_norm_clipped": 1.0}
    for i, layer in enumerate(LAYERS, 1):
        record.update({f"grad/norm/{layer}": 0.5, f"weight/norm/{layer}": 3.0, f"act/std/act{i}": 1.0,
                       f"act/dead_frac/act{i}": 0.01})
    return {**record, **(metrics or {})}


def steps(n: int, start: int = 1, metrics: dict | None = None) -> list[dict]:
    return [log_step(s, metrics=metrics) for s in range(start, start + n)]


def epoch_row(epoch: int, train_acc: float, val_acc: float, val_loss: float) -> dict:
    return {"epoch": epoch, "step": 10 * epoch, "epoch/train_loss": 0.1, "epoch/train_acc": train_acc,
            "val/acc": val_acc, "val/loss": val_loss, "epoch/lr": 1e-3, "epoch/samples_per_s": 1000.0}


def nonfinite(step: int, kind: str = "forward") -> dict:
    return {"step": step, "nonfinite/step": step, "nonfinite/where": f"{kind} fc2", "nonfinite/kind": kind,
            "nonfinite/layer": "fc2", "nonfinite/action": "stop"}


def finding_event(step: int, rule: str) -> dict:
    """The event the live driver writes when a rule trips."""
    return {"step": step, "finding/rule": rule, "finding/title": "T", "finding/decisive": True, "finding/message": "M"}


def found(records: list[dict], config: dict | None = None) -> dict[str, dict]:
    return {f["rule"]: f for f in diagnose(records, Summary(config=config or {}))}


# rule -> (records, the step at which it trips); every record before that step leaves it untripped
CLIP_ON = {"clip": {"name": "norm", "max_norm": 0.01}}
CRAFTED = {
    "divergence": (steps(6) + [nonfinite(7)], 7, {}),
    "clipping_zeroed_update": (steps(6) + [nonfinite(7, "grad_norm")], 7, CLIP_ON),
    "lr_too_high": (steps(2) + [log_step(3, loss=150.0)], 3, {}),  # thrown above any untrained model's loss
    "loss_flat": ([log_step(s, loss=2.3 + 0.001 * (s % 2)) for s in range(1, 9)], 5, {}),
    "no_progress": ([log_step(s, loss=2.0 - 0.01 * s) for s in range(1, 15)], 10, {}),
    "vanishing_gradients": (steps(3) + steps(12, start=4, metrics={"grad/norm/fc1": 1e-6}), 13, {}),
    "exploding_gradients": (steps(10) + [log_step(s, loss=1.0, metrics={"grad/global_norm": 50.0}) for s in range(11, 16)],
                            13, {}),
    "bad_init_scale": (steps(3, metrics={"act/std/act3": 0.01}), 1, {}),
    "dying_relu": (steps(2) + steps(8, start=3, metrics={"act/dead_frac/act2": 0.8}), 7, {}),
    "dead_network": (steps(2) + steps(5, start=3, metrics={"act/dead_frac/act1": 1.0}), 5, {}),
    "overfitting": ([epoch_row(1, 0.8, 0.78, 0.5), epoch_row(2, 0.9, 0.8, 0.4), epoch_row(3, 0.95, 0.8, 0.5),
                     epoch_row(4, 0.97, 0.8, 0.55), epoch_row(5, 0.99, 0.8, 0.6), epoch_row(6, 1.0, 0.8, 0.7)], 50, {}),
    "clip_too_low": (steps(12, metrics={"grad/clip_frac": 0.9}), 10, CLIP_ON),
}
# the oscillation form of lr_too_high: a loss swinging about its start for LR_WINDOW log steps
SWINGING = [log_step(s, loss=2.3 + (0.4 if s % 2 else -0.3)) for s in range(1, 20)]


@pytest.mark.parametrize("rule", sorted(CRAFTED))
def test_each_rule_trips_at_the_first_step_its_records_satisfy_it(rule):
    records, step, config = CRAFTED[rule]
    finding = found(records, config).get(rule)
    assert finding is not None and finding["step"] == step == finding["evidence"]["step"]
    assert finding["interventions"] and "threshold" in finding["evidence"] and finding["evidence"]["metric"]
    assert rule not in found([r for r in records if r["step"] < step], config)  # not one record sooner
    assert finding["decisive"] == (rule in ("no_progress", "vanishing_gradients", "dead_network", "exploding_gradients"))


def test_a_swinging_loss_without_a_downward_trend_trips_lr_too_high_when_its_window_is_full():
    finding = found(SWINGING)["lr_too_high"]
    assert finding["step"] == rules.LR_WINDOW and "oscillates" in finding["title"]
    assert "lr_too_high" not in found(SWINGING[: rules.LR_WINDOW - 1])
    # the same swing about a falling loss is noise on a downward trend
    falling = [log_step(s, loss=(2.3 + (0.4 if s % 2 else -0.3)) * 0.8 ** s) for s in range(1, 20)]
    assert "lr_too_high" not in found(falling)


@pytest.mark.parametrize("spikes", [1, 2])
def test_a_spike_is_no_finding(spikes):
    """README's deep_mlp example had one spike of 117x its running median: no finding now."""
    records = steps(20) + steps(spikes, start=21, metrics={"grad/global_norm": 117.0}) + steps(20, start=21 + spikes)
    records += [log_step(s, loss=2.3 if s != 30 else 9.0) for s in range(60, 80)]  # and one loss spike in a flat stretch
    assert "exploding_gradients" not in found(records) and "lr_too_high" not in found(records)


def test_a_norm_that_rises_while_the_loss_falls_is_a_network_waking_up():
    """init=normal init.std=0.01 with tanh: the gradients grow from 0.1 to their working size as
    the loss starts to fall; no explosion (until the loss stops falling)."""
    waking = [log_step(s, loss=2.3, metrics={"grad/global_norm": 0.1}) for s in range(1, 7)]
    waking += [log_step(s, loss=2.3 - 0.1 * (s - 6), metrics={"grad/global_norm": 1.5}) for s in range(7, 12)]
    assert "exploding_gradients" not in found(waking)
    stalled = waking + [log_step(12, loss=2.3, metrics={"grad/global_norm": 1.5})]
    assert found(stalled)["exploding_gradients"]["step"] == 12


def test_a_broken_streak_starts_again():
    """Patience counts log steps running: one healthy log step in between resets it."""
    almost = rules.VANISHING_PATIENCE - 1
    vanishing = {"grad/norm/fc1": 1e-6}
    records = steps(almost, metrics=vanishing) + steps(1, start=almost + 1) + steps(almost, start=almost + 2, metrics=vanishing)
    assert "vanishing_gradients" not in found(records)
    one_more = steps(1, start=2 * almost + 2, metrics=vanishing)
    assert found(records + one_more)["vanishing_gradients"]["step"] == 2 * almost + 2


def mixed_run() -> list[dict]:
    """A run that trips several rules, with finding events where a live run writes them."""
    records = [log_step(1, loss=2.3, metrics={"act/std/act3": 0.001})]  # bad init scale at once
    records += [log_step(s, loss=2.3 + 0.001 * (s % 2), metrics={"grad/norm/fc1": 1e-6, "act/dead_frac/act2": 0.9})
                for s in range(2, 14)]
    records += [epoch_row(1, 0.1, 0.1, 2.3)]
    records += [log_step(s, loss=900.0) for s in range(14, 18)]  # then the step blows the loss up
    return records + [nonfinite(18)]


def test_live_and_offline_give_the_same_findings_at_the_same_steps():
    records, summary = mixed_run(), Summary(config={"monitor": {"per_layer": True}})
    watch, live = Watch(summary.config), []
    for record in records:
        new = watch.feed(record)
        live += new
        if new:  # the driver writes a finding event for each: the watch must not read it
            live += watch.feed(finding_event(record["step"], new[0].rule))
    offline = diagnose(records, summary)
    assert sorted((f.rule, f.step) for f in live) == sorted((f["rule"], f["step"]) for f in offline)
    assert [asdict(f) for f in watch.findings()] == offline
    # each finding was shown live as the final diagnosis shows it (cause and advice settled when it tripped)
    assert {f.rule: asdict(f) for f in live} == {f["rule"]: f for f in offline}
    assert {f["rule"] for f in offline} >= {"bad_init_scale", "loss_flat", "vanishing_gradients", "dying_relu",
                                            "no_progress", "lr_too_high", "divergence"}


def test_finding_events_are_ignored():
    records = mixed_run()
    with_events = []
    for record in records:
        with_events += [record, finding_event(record["step"], "exploding_gradients")]
    # even one that also carries a log step's keys, and a claim of a rule the records do not satisfy
    with_events.insert(3, {**log_step(3, loss=1e9), **finding_event(3, "lr_too_high")})
    assert diagnose(with_events, Summary()) == diagnose(records, Summary())


def test_the_loss_rules_stop_at_a_nonfinite_event():
    records = steps(3) + [nonfinite(4)] + [log_step(s, loss=2.3) for s in range(5, 30)]
    assert list(found(records)) == ["divergence"]


def test_a_too_large_step_leads_and_its_consequences_rank_under_it():
    """optimizer.lr=10: the loss thrown up and stuck there, act1 dead, fc1's gradient gone. The
    diagnosis leads with the step, and nothing under it says to raise (or, again, to lower) the lr."""
    records = [log_step(s, loss=500.0 + 0.1 * (s % 2), metrics={"grad/norm/fc1": 0.0, "act/dead_frac/act1": 1.0})
               for s in range(5, 80, 5)]
    ranked = diagnose(records, Summary())
    assert ranked[0]["rule"] == "lr_too_high" and ranked[0]["cause"] is None and ranked[0]["step"] == 5
    under = ranked[1:]
    assert [f["rule"] for f in under] == ["dead_network", "loss_flat", "dying_relu", "vanishing_gradients", "no_progress"]
    assert all(f["cause"] == "lr_too_high" for f in under)
    pointer = f'see "{ranked[0]["title"]}"'
    for f in under:
        assert not any(i.startswith(("raise the learning rate", "lower the learning rate")) for i in f["interventions"])
        assert f["rule"] == "vanishing_gradients" or pointer in f["interventions"]  # it gave no lr advice to replace


def test_a_bad_init_scale_explains_vanishing_gradients_and_a_flat_loss():
    records = [log_step(s, loss=2.303 - 0.0001 * s, metrics={"act/std/act3": 1e-8, "grad/norm/fc1": 1e-7, "act/dead_frac/act3": 0.7})
               for s in range(1, 12)]
    ranked = diagnose(records, Summary())
    assert [f["rule"] for f in ranked][0] == "bad_init_scale"
    assert {f["rule"]: f["cause"] for f in ranked[1:]} == {"loss_flat": "bad_init_scale", "dying_relu": "bad_init_scale",
                                                           "vanishing_gradients": "bad_init_scale", "no_progress": "bad_init_scale"}
    advice = [i for f in ranked for i in f["interventions"]]
    assert not any(i.startswith("raise the learning rate") for i in advice)
    assert not any(i.startswith("lower the learning rate") for i in advice)


def test_a_later_sign_does_not_explain_an_earlier_one():
    records = [log_step(s, loss=2.3 + 0.001 * (s % 2)) for s in range(1, 6)] + [log_step(6, loss=500.0)]
    ranked = diagnose(records, Summary())
    assert [(f["rule"], f["cause"]) for f in ranked] == [("loss_flat", None), ("lr_too_high", None)]


def test_a_loss_thrown_up_by_an_init_that_grows_is_the_inits():
    """20 ReLU layers at init.std=1.0: the loss is 5e22 at the first log step, before any step
    could have thrown it, and the pre-clip norm overflowed at step 1 (its event arrives after the
    log step of step 10). No "learning rate too high"; the event is listed at its own step."""
    records = [log_step(10, loss=5e22, metrics={"act/std/act1": 16.9, "act/std/act3": 2.2e21}),
               nonfinite(1, "grad_norm")]
    ranked = diagnose(records, Summary(config=CLIP_ON))
    assert [(f["rule"], f["step"]) for f in ranked] == [("clipping_zeroed_update", 1), ("bad_init_scale", 10)]
    # the same loss with sound activation scales is the step's
    sound = [log_step(10, loss=5e22), nonfinite(1, "grad_norm")]
    assert [f["rule"] for f in diagnose(sound, Summary(config=CLIP_ON))] == ["clipping_zeroed_update", "lr_too_high"]


def test_findings_never_give_opposite_advice():
    """Two findings with no cause between them: the later one's advice that turns the same knob the
    other way is replaced by a pointer to the earlier one."""
    records = [log_step(s, loss=2.3 + 0.001 * (s % 2), metrics={"act/dead_frac/act2": 0.9}) for s in range(1, 8)]
    ranked = diagnose(records, Summary())
    assert [f["rule"] for f in ranked] == ["loss_flat", "dying_relu"]
    assert rules.RAISE_LR in ranked[0]["interventions"]
    assert rules.LOWER_LR not in ranked[1]["interventions"]
    assert f'see "{ranked[0]["title"]}"' in ranked[1]["interventions"]
    clip = found(steps(10) + steps(12, start=11, metrics={"grad/global_norm": 50.0, "grad/clip_frac": 0.9}), CLIP_ON)
    advice = [i for f in clip.values() for i in f["interventions"]]
    assert not (any(i.startswith("raise clip.max_norm") for i in advice)
                and any(i.startswith("clip the gradient norm") for i in advice))


def test_vanishing_gradients_explain_a_loss_that_makes_no_progress_and_trip_first():
    """The 10-layer sigmoid net at init.std=0.01: no activation scale to blame, gradients gone from
    fc1 and the loss stuck. Both trip at the 10th log step; the gradients are the cause (and the one
    a stop names), the stuck loss is ranked under them without its "raise the lr"."""
    watch, tripped = Watch({}), []
    for s in range(1, 12):
        tripped += [f.rule for f in watch.feed(log_step(s, loss=2.303 - 0.0001 * s, metrics={"grad/norm/fc1": 1e-11}))]
    assert tripped[tripped.index("vanishing_gradients") + 1] == "no_progress"
    ranked = {f.rule: f for f in watch.findings()}
    assert ranked["no_progress"].cause == "vanishing_gradients" and ranked["vanishing_gradients"].cause is None
    assert f'see "{ranked["vanishing_gradients"].title}"' in ranked["no_progress"].interventions
    assert not any(i.startswith("raise the learning rate") for i in ranked["no_progress"].interventions)


def test_monitor_off_leaves_the_loss_rules_running():
    watch = Watch({"monitor": {"per_layer": False}})
    assert watch.inactive == ["bad_init_scale", "exploding_gradients", "dead_network", "vanishing_gradients", "dying_relu",
                              "clip_too_low"]
    for s in range(1, 30):
        watch.feed(log_step(s, loss=2.3, metrics={"grad/norm/fc1": 1e-6, "act/dead_frac/act1": 1.0, "act/std/act3": 1e-6}))
    assert [f.rule for f in watch.findings()] == ["loss_flat", "no_progress"]
    assert Watch({}).inactive == [] and Watch({"monitor": {}}).inactive == []  # older runs: the records decide


def test_window_median_equals_statistics_median_of_the_last_values():
    rng = random.Random(0)
    values = [rng.choice([rng.random(), rng.randint(0, 5), 1e30, -2.0]) for _ in range(300)]
    median = WindowMedian(7)
    for i, value in enumerate(values, 1):
        median.add(value)
        assert len(median) == min(i, 7) and median.median == statistics.median(values[max(0, i - 7):i])


# ---------------------------------------------------------------- hostile records

@pytest.mark.parametrize("junk", ["2.3", None, True, [1.0], {"v": 1}, math.nan, math.inf, -math.inf, 10 ** 400])
def test_a_metric_that_is_not_a_finite_number_is_skipped(junk):
    """Whatever a record holds where a number belongs, no rule crashes or judges it."""
    keys = ["train/loss", "grad/global_norm", "grad/norm/fc1", "grad/norm/fc3", "act/std/act1", "act/dead_frac/act2",
            "grad/clip_frac", "weight/norm/fc1"]
    junk_steps = [{**log_step(s), **{k: junk for k in keys}} for s in range(1, 40)]
    junk_epochs = [{**epoch_row(e, 1.0, 0.5, 0.5), "val/loss": junk, "epoch/train_acc": junk} for e in range(1, 8)]
    assert diagnose(junk_steps + junk_epochs, Summary(config=CLIP_ON)) == []


@pytest.mark.parametrize("record", [
    {"step": "7", "nonfinite/step": 7, "nonfinite/where": "forward fc1"},  # a step that is no integer
    {"step": True, "nonfinite/step": 7},
    {"nonfinite/step": 7, "nonfinite/where": "forward fc1"},  # no step at all
    {"step": 7.5, "perf/step_ms": 1.0, "train/loss": 1e9},
    {"step": 7, "train/loss": 1e9},  # neither a log step nor an epoch row nor an event
    [7], "record", None, 7,  # not an object
])
def test_a_record_the_rules_cannot_place_is_ignored(record):
    assert diagnose(steps(5) + [record] + steps(5, start=6), Summary()) == []


@pytest.mark.parametrize("config", [{"monitor": "off"}, {"monitor": {"per_layer": "no"}}, {"clip": ["norm"]},
                                    {"clip": {"name": None}}, None, [], "config"])
def test_a_config_of_the_wrong_shape_is_read_as_absent(config):
    watch = Watch(config)
    assert watch.inactive == [] and not watch.clipping
    for record in CRAFTED["dying_relu"][0]:
        watch.feed(record)
    assert [f.rule for f in watch.findings()] == ["dying_relu"]


def test_zero_norms_and_stds_divide_nothing_by_zero():
    records = steps(30, metrics={"grad/norm/fc3": 0.0, "grad/norm/fc1": 0.0, "act/std/act1": 0.0, "grad/global_norm": 0.0})
    records += [log_step(s, loss=0.0) for s in range(31, 50)]
    assert "lr_too_high" not in found(records) and "vanishing_gradients" not in found(records)


def test_layers_that_change_between_records_are_judged_per_record():
    records = [{k: v for k, v in log_step(s, metrics={"grad/norm/fc1": 1e-6}).items() if not (s % 2 and k.endswith("fc2"))}
               for s in range(1, 12)]
    records += [{**log_step(12, metrics={"grad/norm/fc1": 1e-6}), "grad/norm/extra": 9.0}]  # a layer that has no weight is not judged
    assert found(records)["vanishing_gradients"]["step"] == rules.VANISHING_PATIENCE


def write_run(run_dir, records: list, lines: tuple[str, ...] = ()) -> None:
    """A finished run's files: its records, then `lines` written as they are."""
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "config": {"monitor": {"per_layer": True}}}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(l + "\n" for l in lines))


def listing(root) -> dict:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("records,lines", [
    ([], ['{"step": 1, "perf/step_ms": 1.0, "train/loss": 1' + "0" * 400 + "}"]),  # an integer beyond float range
    ([{k: v for k, v in log_step(1).items() if k != "step"}], ()),  # a log step without its step
    (steps(5, metrics={"grad/global_norm": 0.0}), ()),  # a norm off zero is "infinitely" many times its median
    ([{**log_step(1), "train/loss": "NaN"}, {"step": "x", "perf/step_ms": 1.0}, finding_event(1, "lr_too_high")], ()),
], ids=["huge-integer", "no-step", "zero-median", "strings-and-a-finding-event"])
def test_diagnose_of_hostile_records_prints_the_findings_and_writes_nothing(tmp_path, records, lines):
    """Today's main crashed on the first three (OverflowError, KeyError, ZeroDivisionError: exit 1)."""
    write_run(tmp_path / "run", records + CRAFTED["dead_network"][0][2:], lines)
    before = listing(tmp_path)
    out = run_cli(["diagnose", str(tmp_path / "run")], tmp_path)
    assert out.returncode == 0 and not out.stderr
    assert "Dead network" in out.stdout and "Learning rate too high" not in out.stdout  # a finding event is no evidence
    assert "Exploding" not in out.stdout
    assert listing(tmp_path) == before


def test_diagnose_prints_a_layer_named_like_markup_as_named(tmp_path):
    layer = "[red]fc1[/red]"
    records = [{**log_step(s), f"act/dead_frac/{layer}": 1.0} for s in range(1, 5)]
    write_run(tmp_path / "run", records)
    before = listing(tmp_path)
    out = run_cli(["diagnose", str(tmp_path / "run")], tmp_path)
    assert out.returncode == 0 and not out.stderr and f"units of {layer} are zero" in out.stdout
    assert listing(tmp_path) == before


def test_a_finding_event_alone_is_no_finding(tmp_path):
    """A run killed right after its driver wrote a finding event, and nothing else: no finding is
    made up from the event (the rules judge metrics, never claims)."""
    write_run(tmp_path / "run", [finding_event(50, "no_progress")])
    before = listing(tmp_path)
    out = run_cli(["diagnose", str(tmp_path / "run")], tmp_path)
    assert out.returncode == 0 and "no findings" in out.stdout and listing(tmp_path) == before
