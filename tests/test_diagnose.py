"""Diagnostics: crafted runs through the real CLI trip each rule; a healthy run trips none;
the logged per-layer metrics match an independent recomputation; NaN/Inf attribution."""

import io
import json
import math

import pytest
import torch
from conftest import assert_no_nonfinite_numbers, compose_train, run_cli
from rich.console import Console
from torch import nn

from regexp.config import validate
from regexp.data import load_data
from regexp.diagnose import diagnose
from regexp.init import init_weights
from regexp.models import build_model
from regexp.monitor import trace_nonfinite
from regexp.rundir import Summary
from regexp.state import seed_everything
from regexp.tracking import Reporter
from regexp.train import train

BASE = ["logger=none", "dataset.val_size=1000"]
DEEP = ["model=deep_mlp", "batch_size=64"]

# rule -> the crafted run that must trip it (docs/diagnostics.md)
CRAFTED = {
    "divergence": [*DEEP, "model.depth=20", "model.width=256", "init=normal", "init.std=0.1", "optimizer=sgd",
                   "optimizer.lr=0.1", "dataset.limit=2000", "epochs=1", "monitor.log_every=10"],
    "clipping_zeroed_update": [*DEEP, "model.depth=20", "model.width=256", "init=normal", "init.std=1.0", "optimizer=sgd",
                               "optimizer.lr=0.1", "clip=norm", "clip.max_norm=1.0", "dataset.limit=2000", "epochs=1", "monitor.log_every=10"],
    "lr_too_high": ["model.activation=tanh", "optimizer=sgd", "optimizer.lr=5", "dataset.limit=4000", "epochs=3", "monitor.log_every=5"],
    "loss_flat": ["optimizer=sgd", "optimizer.lr=1e-6", "dataset.limit=3000", "epochs=1", "monitor.log_every=4"],
    # 250 steps: the sign must hold 10 log steps over 200 optimizer steps
    "vanishing_gradients": ["model=deep_mlp", "batch_size=8", "model.depth=10", "model.width=128", "model.activation=sigmoid",
                            "optimizer=sgd", "optimizer.lr=0.1", "dataset.limit=2000", "epochs=1", "monitor.log_every=5"],
    # sustained: the norm 10x its recent median three log steps running (steps 25-35), before it diverges at step 38
    "exploding_gradients": ["optimizer=momentum", "optimizer.lr=0.5", "dataset.limit=4000", "epochs=3", "monitor.log_every=5"],
    "bad_init_scale": [*DEEP, "model.depth=10", "model.width=256", "init=normal", "init.std=0.15", "dataset.limit=320",
                       "epochs=1", "monitor.log_every=1", "clip=norm"],
    "dying_relu": ["optimizer=adam", "optimizer.lr=0.05", "dataset.limit=3000", "epochs=2", "monitor.log_every=5"],
    "overfitting": ["dataset.limit=200", "epochs=25", "batch_size=50", "monitor.log_every=4"],
    "clip_too_low": ["clip=norm", "clip.max_norm=0.001", "dataset.limit=2000", "epochs=1", "monitor.log_every=1"],
}


def run_and_read(tmp_path, data_root, overrides):
    out = run_cli(["train", *BASE, *overrides, f"hydra.run.dir={tmp_path}/run"], tmp_path, data_root)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    on_disk = json.loads((tmp_path / "run" / "diagnosis.json").read_text())["findings"]
    assert on_disk == summary["findings"]
    return summary, out.stdout


@pytest.mark.parametrize("rule", sorted(CRAFTED))
@pytest.mark.slow
def test_crafted_run_trips_its_rule(tmp_path, data_root, rule):
    summary, stdout = run_and_read(tmp_path, data_root, CRAFTED[rule])
    finding = next((f for f in summary["findings"] if f["rule"] == rule), None)
    assert finding is not None, [f["rule"] for f in summary["findings"]]
    assert finding["interventions"] and finding["evidence"]["metric"]
    assert "diagnosis" in stdout and finding["title"].split(":")[0] in stdout
    # `regexp diagnose` re-reads the same run from its files
    again = run_cli(["diagnose", str(tmp_path / "run")], tmp_path)
    assert again.returncode == 0 and finding["title"].split(":")[0] in again.stdout


@pytest.mark.slow
def test_divergence_names_the_first_bad_layer_and_keeps_a_finite_checkpoint(tmp_path, data_root):
    summary, _ = run_and_read(tmp_path, data_root, CRAFTED["divergence"])
    assert summary["status"] == "diverged" and summary["steps"] <= 10
    event = summary["nonfinite"]
    assert event["nonfinite/kind"] == "forward" and event["nonfinite/layer"].startswith("fc")
    finding = next(f for f in summary["findings"] if f["rule"] == "divergence")
    assert finding["evidence"]["layer"] == event["nonfinite/layer"]
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert_no_nonfinite_numbers(tmp_path / "run" / "metrics.jsonl")


@pytest.mark.slow
def test_overflowing_preclip_norm_is_caught_not_reported_healthy(tmp_path, data_root):
    summary, _ = run_and_read(tmp_path, data_root, CRAFTED["clipping_zeroed_update"])
    assert summary["status"] == "diverged"
    assert summary["nonfinite"]["nonfinite/kind"] == "grad_norm"
    assert [f["rule"] for f in summary["findings"]][0] == "clipping_zeroed_update"


@pytest.mark.slow
def test_healthy_default_run_has_no_findings(tmp_path, data_root):
    summary, stdout = run_and_read(tmp_path, data_root, ["dataset.limit=5000", "epochs=3"])
    assert summary["status"] == "completed" and summary["metrics"]["test/acc"] > 0.9
    assert summary["findings"] == [] and "no findings" in stdout


@pytest.mark.slow
def test_skip_and_continue_never_log_a_nan(tmp_path, data_root):
    for action in ("skip", "continue"):
        out = run_cli(["train", *BASE, *CRAFTED["divergence"], "epochs=1", "max_steps=20", f"monitor.on_nonfinite={action}",
                       f"hydra.run.dir={tmp_path}/{action}"], tmp_path, data_root)
        assert out.returncode == 0, out.stderr[-2000:]
        summary = json.loads((tmp_path / action / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["nonfinite"]["nonfinite/action"] == action
        assert_no_nonfinite_numbers(tmp_path / action / "metrics.jsonl")
        if action == "skip":
            assert summary["skipped_steps"] >= 1


def test_logged_layer_metrics_equal_an_independent_recomputation(tmp_path, data_root):
    overrides = [f"dataset.root={data_root}", "dataset.limit=256", "dataset.val_size=100", "batch_size=64", "max_steps=1",
                 "epochs=1", "monitor.log_every=1", "device=cpu", "logger=none", "optimizer=sgd", "optimizer.lr=0.5",
                 "clip=norm", "clip.max_norm=0.5", "model.hidden=[32,16]", "seed=7"]
    cfg = validate(compose_train(overrides))
    train(cfg, tmp_path / "run", reporter=Reporter(Console(file=io.StringIO())))
    [logged] = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "perf/step_ms" in l]

    # the same model, batch and step, by hand
    seed_everything(7)
    data = load_data(cfg.dataset, torch.device("cpu"))
    model = build_model(cfg.model, cfg.norm, None, data.input_shape, data.num_classes)
    init_weights(model, cfg.init, "relu")
    idx = torch.randperm(len(data.train_y))[:64]
    x, y = data.train_x[idx], data.train_y[idx]
    h = x.flatten(1)
    acts = {}
    for k in (1, 2):
        h = torch.relu(getattr(model, f"fc{k}")(h))
        acts[f"act{k}"] = h.detach()
    loss = nn.functional.cross_entropy(model.fc3(h), y)
    loss.backward()
    before = {n: getattr(model, n).weight.detach().clone() for n in ("fc1", "fc2", "fc3")}
    layer_norm = {n: math.sqrt(sum(p.grad.pow(2).sum().item() for p in getattr(model, n).parameters())) for n in before}
    total = math.sqrt(sum(v ** 2 for v in layer_norm.values()))
    scale = min(1.0, 0.5 / (total + 1e-6))
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad * scale

    assert logged["train/loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert logged["grad/global_norm"] == pytest.approx(total, rel=1e-5)
    assert logged["grad/global_norm_clipped"] == pytest.approx(total * scale, rel=1e-4)
    assert logged["grad/clip_frac"] == (1.0 if total > 0.5 else 0.0)
    for name in before:
        assert logged[f"grad/norm/{name}"] == pytest.approx(layer_norm[name], rel=1e-5)
        assert logged[f"grad/norm_clipped/{name}"] == pytest.approx(layer_norm[name] * scale, rel=1e-4)
        w = getattr(model, name).weight.detach()
        assert logged[f"weight/norm/{name}"] == pytest.approx(w.norm().item(), rel=1e-5)
        assert logged[f"weight/update_ratio/{name}"] == pytest.approx(((w - before[name]).norm() / w.norm()).item(), rel=1e-4)
        assert logged[f"weight/sparsity/{name}"] == pytest.approx((w.abs() < 1e-3).float().mean().item(), abs=1e-6)
    for name, a in acts.items():
        assert logged[f"act/mean/{name}"] == pytest.approx(a.mean().item(), rel=1e-5)
        assert logged[f"act/std/{name}"] == pytest.approx(a.std().item(), rel=1e-5)
        assert logged[f"act/dead_frac/{name}"] == pytest.approx((a.amax(0) == 0).float().mean().item())


def test_trace_names_the_layer_made_to_produce_inf():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[2].weight[0, :] = 1e38  # fc output overflows to inf from a finite input
    x, y = torch.randn(16, 4).abs() + 1, torch.randint(0, 3, (16,))

    def batch():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    found = trace_nonfinite(model, batch)
    assert found["where"] == "forward" and found["layer"] == "2"
    x_bad = x.clone()
    x_bad[0, 0] = float("nan")
    assert trace_nonfinite(model, lambda: nn.functional.cross_entropy(model(x_bad), y))["where"] == "input"


def test_trace_names_a_backward_only_blowup():
    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    class Blower(nn.Module):
        def forward(self, x):
            return InfGrad.apply(x)

    model = nn.Sequential(nn.Linear(4, 8), Blower(), nn.Linear(8, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))

    def batch():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    assert trace_nonfinite(model, batch) == {"where": "backward", "layer": "1", "loss": pytest.approx(nn.functional.cross_entropy(model(x), y).item())}


def test_rules_on_a_hand_made_healthy_history():
    steps = [{"step": s, "train/loss": 2.3 / s, "perf/step_ms": 1.0, "grad/global_norm": 1.0 + 0.1 * (s % 3),
              "grad/norm/fc1": 0.5, "grad/norm/fc2": 0.6, "weight/norm/fc1": 3.0, "weight/norm/fc2": 2.0,
              "act/std/act1": 1.0, "act/std/act2": 0.9, "act/std/act3": 1.1, "act/dead_frac/act1": 0.01} for s in range(1, 30)]
    epochs = [{"epoch": e, "epoch/train_acc": 0.9 + 0.01 * e, "val/acc": 0.89 + 0.01 * e, "val/loss": 0.5 - 0.05 * e} for e in range(1, 5)]
    assert diagnose(steps + epochs, Summary(config={"clip": {"name": "none"}})) == []


# ---------------------------------------------------------------- reading runs: long, failed, running, corrupted

def step_records(n: int, exploding_from: int | None = None) -> list[dict]:
    """n log steps of a healthy 2-layer history; the gradient norm exploding from `exploding_from` on
    (and the loss back at its start)."""
    exploding = [exploding_from is not None and s >= exploding_from for s in range(n + 1)]
    return [{"step": s, "train/loss": 2.3 if exploding[s] else 2.3 / s, "perf/step_ms": 1.0,
             "grad/global_norm": 100.0 if exploding[s] else 1.0 + 0.1 * (s % 3),
             "grad/norm/fc1": 0.5, "grad/norm/fc2": 0.6, "weight/norm/fc1": 3.0, "weight/norm/fc2": 2.0} for s in range(1, n + 1)]


def test_a_long_run_is_diagnosed_in_linear_time():
    """30k log steps: a median recomputed over the whole history at every step took ~15 s."""
    import time

    records = step_records(30_000)
    started = time.process_time()
    assert diagnose(records, Summary()) == []
    assert time.process_time() - started < 8


def write_run(run_dir, summary: dict | str | None, records: list[dict] | None = None, tail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    if summary is not None:
        (run_dir / "summary.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))
    if records is not None:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_diagnose_a_failed_run_says_so_and_diagnoses_what_it_recorded(tmp_path):
    error = "RuntimeError: CUDA out of memory\nTried to allocate 2 GiB"
    write_run(tmp_path / "nothing", {"status": "failed", "error": error})  # failed before its first log step
    out = run_cli(["diagnose", str(tmp_path / "nothing")], tmp_path)
    assert out.returncode == 0 and not out.stderr
    assert "the run failed (RuntimeError: CUDA out of memory); diagnosing the 0 log steps it recorded" in out.stdout
    assert "no findings" in out.stdout and "Tried to allocate" not in out.stdout

    write_run(tmp_path / "some", {"status": "failed", "error": error}, step_records(40, exploding_from=30))
    out = run_cli(["diagnose", str(tmp_path / "some")], tmp_path)
    assert out.returncode == 0 and "diagnosing the 40 log steps it recorded" in out.stdout
    assert "Exploding gradients" in out.stdout


def test_diagnose_a_running_run_with_a_half_written_last_line(tmp_path):
    write_run(tmp_path / "run", {"status": "running"}, step_records(5), tail='{"step": 6, "train/lo')
    out = run_cli(["diagnose", str(tmp_path / "run")], tmp_path)
    assert out.returncode == 0 and not out.stderr
    assert "still running" in out.stdout and "5 log steps" in out.stdout


@pytest.mark.parametrize("summary,tail,file,why", [
    ('{"status": "completed", "metr', "", "summary.json", "not valid JSON"),  # truncated
    ("[1, 2, 3]", "", "summary.json", "a JSON object was expected"),
    ('{"status": "completed"}', 'garbage\n{"step": 9}\n', "metrics.jsonl:6", "not a JSON record"),
    ('{"status": "completed"}', "[1]\n", "metrics.jsonl:6", "not a JSON object"),
])
def test_diagnose_a_corrupted_record_is_one_line_exit_1(tmp_path, summary, tail, file, why):
    write_run(tmp_path / "run", summary, step_records(5), tail=tail)
    out = run_cli(["diagnose", str(tmp_path / "run")], tmp_path)
    assert out.returncode == 1 and not out.stdout
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"regexp: error: {tmp_path / 'run' / file}")
    assert why in out.stderr


@pytest.mark.parametrize("args,message", [
    (["{tmp}"], "not a run directory (no summary.json or metrics.jsonl)"),
    ([], "the following arguments are required: RUN_DIR"),
    (["{tmp}", "{tmp}"], "unrecognized arguments"),
])
def test_diagnose_bad_input_exits_2_with_one_line(tmp_path, args, message):
    out = run_cli(["diagnose", *(a.format(tmp=tmp_path) for a in args)], tmp_path)
    assert out.returncode == 2 and not out.stdout
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("regexp: error: ") and message in out.stderr


def test_diagnose_help_documents_the_exit_codes(tmp_path):
    out = run_cli(["diagnose", "--help"], tmp_path)
    assert out.returncode == 0 and "Exit codes: 0" in out.stdout and "failed" in out.stdout
