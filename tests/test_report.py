"""`regexp report`: one self-contained HTML file (table, curves, health figures, findings,
config differences, every run's dir), refused inputs, escaping, and the page as a real
headless browser (chromium) opens it."""

import base64
import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, refused, require_chromium, require_shared_data, run_cli, snapshot
from test_compare import make_run

HOSTILE_DIR = "<img src=x onerror=alert(1)>"  # a legal directory name that is also HTML
HOSTILE_ERROR = "<script>alert('error')</script> RuntimeError: boom"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def log_records(seed: int, steps: int = 40, epochs: int = 2) -> list[dict]:
    """metrics.jsonl of a small healthy MLP: log steps with the monitor's keys, an evaluation per epoch."""
    records, per_epoch = [], steps // epochs
    for step in range(2, steps + 1, 2):
        loss = 2.3 / (1 + 0.1 * step) + 0.01 * seed
        records.append({"step": step, "epoch": (step - 1) // per_epoch + 1, "train/loss": loss, "train/acc": 1 - loss / 3,
                        "opt/lr": 1e-3, "grad/global_norm": 1.0 + 0.01 * step, "grad/global_norm_clipped": 1.0,
                        "perf/step_ms": 5.0,
                        **{f"grad/norm/fc{i}": 0.5 * i for i in (1, 2, 3)},
                        **{f"weight/norm/fc{i}": 10.0 / i for i in (1, 2, 3)},
                        **{f"weight/update_ratio/fc{i}": 1e-3 * i for i in (1, 2, 3)},
                        **{f"act/std/act{i}": 0.8 for i in (1, 2)}, **{f"act/dead_frac/act{i}": 0.1 for i in (1, 2)}})
        if step % per_epoch == 0:
            epoch = step // per_epoch
            records.append({"epoch": epoch, "step": step, "epoch/train_loss": loss, "epoch/train_acc": 1 - loss / 3,
                            "val/loss": loss * 1.1, "val/acc": 0.8 + 0.05 * epoch + 0.005 * seed})
    return records


def regularized_run(root: Path, name: str, regularizer: str, seed: int, acc: float | None, status: str = "completed",
                    **summary) -> Path:
    """A run of a dropout-vs-L2 sweep as `regexp train` leaves it."""
    config = {"seed": seed, "epochs": 2, "optimizer": {"name": "adam", "lr": 1e-3},
              "regularizer": {"dropout": {"p": 0.5} if regularizer == "dropout" else None,
                              "l2": {"coef": 1e-4} if regularizer == "l2" else None}}
    run_dir = make_run(root, name, [f"+regularizer={regularizer}", f"seed={seed}", "epochs=2"],
                       metrics={"test/acc": acc, "train/loss": 1 - acc} if acc is not None else None, status=status,
                       choices={"regularizer": regularizer, "optimizer": "adam", "model": "mlp"}, config=config,
                       curve=log_records(seed))
    if summary:
        path = run_dir / "summary.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **summary}))
    return run_dir


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Two groups of three completed seeds, and one failed and one diverged run that are listed, never averaged."""
    root = tmp_path / "sweep"
    for seed in range(3):
        regularized_run(root, f"d{seed}", "dropout", seed, 0.95 + 0.002 * seed)
        regularized_run(root, f"l{seed}", "l2", seed, 0.93 + 0.003 * seed)
    regularized_run(root, "d3", "dropout", 3, None, status="failed", error="RuntimeError: CUDA out of memory\nmore")
    regularized_run(root, "l3", "l2", 3, None, status="diverged", nonfinite={"nonfinite/step": 17})
    return root


def report(capsys, args: list[str]) -> tuple[int, str, str]:
    from regexp import cli

    code = cli.main(["report", *args])
    out, err = capsys.readouterr()
    return code, out, err


def images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)]


# ---------------------------------------------------------------- the page

def test_report_holds_table_figures_findings_config_and_every_run(sweep, tmp_path, capsys):
    out = tmp_path / "report.html"
    code, stdout, err = report(capsys, [str(sweep), "--out", str(out), "--baseline", "regularizer=l2"])
    assert code == 0, err
    assert stdout.startswith(f"report: {out} (8 runs in 2 groups, ") and stdout.count("\n") == 1
    page = out.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing from the network
    assert "<script" not in page and "<link" not in page
    table = page.split("<h2>Comparison</h2>", 1)[1].split("<h2>", 1)[0]
    dropout_row = next(row for row in table.split("<tr") if "<td>dropout</td>" in row)
    assert "0.9520 ± 0.0020 (n=3)" in dropout_row  # the failed run is counted, not averaged
    assert "[0.9470, 0.9570]" in dropout_row  # the 95 % CI (Student's t, 2 degrees of freedom)
    assert "+0.0190" in dropout_row  # the difference of means to the baseline, then its p-value
    assert "baseline" in next(row for row in table.split("<tr") if "<td>l2</td>" in row)
    pngs = images(page)
    assert len(pngs) == 3 and all(png.startswith(PNG_SIGNATURE) for png in pngs)  # curves, and a health figure a group
    assert "median run by test/acc" in page and str(sweep / "d1") in page  # seeds 0, 1, 2: the median is seed 1
    assert "<code>regularizer.dropout.p</code>" in page and "<code>regularizer.l2.coef</code>" in page
    assert "<code>seed</code>" not in page  # seeds are what a group averages over
    runs = page.split("<h2>Runs</h2>", 1)[1]
    assert all(str(sweep / name) in runs for name in ("d0", "d1", "d2", "d3", "l0", "l1", "l2", "l3"))
    assert "RuntimeError: CUDA out of memory" in runs and "more" not in runs  # the error's first line
    assert "non-finite at step 17" in runs


def test_report_shows_each_median_runs_findings(sweep, tmp_path, capsys):
    (sweep / "d1" / "diagnosis.json").write_text(json.dumps({"findings": [
        {"rule": "overfitting", "title": "Overfitting <b>x</b>", "message": "val loss rises", "step": 30,
         "evidence": {"metric": "val/loss", "values": [0.3, 0.5]}, "interventions": ["add dropout"]}]}))
    out = tmp_path / "report.html"
    assert report(capsys, [str(sweep), "--out", str(out)])[0] == 0
    page = out.read_text()
    assert "<b>Overfitting &lt;b&gt;x&lt;/b&gt;</b> at step 30: val loss rises" in page
    assert "evidence: val/loss: 0.3, 0.5" in page and "try: add dropout" in page
    assert "no findings: nothing in the metrics matches a known failure" in page  # the l2 group's median run


def test_report_escapes_every_text_from_runs(tmp_path, capsys):
    root = tmp_path / "sweep"
    for seed in range(2):
        regularized_run(root, f"{HOSTILE_DIR}{seed}", "dropout", seed, 0.9 + 0.01 * seed)
    regularized_run(root, "bad", "<i>l2</i>", 0, None, status="failed", error=HOSTILE_ERROR)
    out = tmp_path / "report.html"
    code, _, err = report(capsys, [str(root), "--out", str(out)])
    assert code == 0, err
    page = out.read_text()
    assert "<script" not in page and "<img src=x" not in page and "<i>l2" not in page
    assert html.escape(f"{HOSTILE_DIR}0") in page and "&lt;i&gt;l2&lt;/i&gt;" in page
    assert html.escape("<script>alert('error')</script> RuntimeError: boom") in page


def test_report_names_a_run_without_a_health_figure_and_goes_on(sweep, tmp_path, capsys):
    (sweep / "d1" / "metrics.jsonl").write_text('{"step": 2, "train/loss": 1.0}\nnot json\n{"step": 4}\n')
    out = tmp_path / "report.html"
    code, _, err = report(capsys, [str(sweep), "--out", str(out)])
    assert code == 0
    assert f"no health figure for {sweep / 'd1'}: {sweep / 'd1' / 'metrics.jsonl'}:2: not a JSON record" in err
    assert "no health figure: " in out.read_text()


def test_a_group_without_a_completed_run_gets_no_figure(tmp_path, capsys):
    root = tmp_path / "sweep"
    regularized_run(root, "d0", "dropout", 0, 0.95)
    regularized_run(root, "l0", "l2", 0, None, status="diverged", nonfinite={"nonfinite/step": 3})
    out = tmp_path / "report.html"
    assert report(capsys, [str(root), "--out", str(out)])[0] == 0
    page = out.read_text()
    assert "no completed run: no health figure" in page and len(images(page)) == 2


def test_report_replaces_an_earlier_file_whole(sweep, tmp_path, capsys):
    out = tmp_path / "report.html"
    out.write_text("old")
    assert report(capsys, [str(sweep), "--out", str(out), "--by", "optimizer.lr"])[0] == 0
    assert out.read_text().startswith("<!DOCTYPE html>") and sorted(p.name for p in tmp_path.iterdir()) == [
        "report.html", "sweep"]  # no temp file left beside it


# ---------------------------------------------------------------- refused inputs: one line, nothing written

@pytest.mark.parametrize("args,message", [
    (["{empty}"], "{empty}: no runs found (no readable summary.json in it or below it)"),
    (["{missing}"], "{missing}: no such directory"),
    (["{sweep}", "--by", "optimizer.momentum"], "--by optimizer.momentum: no run has this key"),
    (["{sweep}", "--baseline", "regularizer=l1"], "--baseline regularizer=l1: no such group; groups: "),
    (["{sweep}", "--metric", "test/accuracy"], "--metric test/accuracy: no run has this metric; available: "),
    (["{sweep}", "--out", "{sweep}"], "--out {sweep}: is a directory; name a file"),
    (["{sweep}", "--by"], "report: argument --by: expected one argument"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(sweep, tmp_path, capsys, empty_cwd, args, message):
    (tmp_path / "empty").mkdir()
    where = {"sweep": sweep, "empty": tmp_path / "empty", "missing": tmp_path / "missing"}
    args = [a.format(**where) for a in args]
    before = snapshot(tmp_path)
    line = refused(capsys, ["report", *args, *([] if "--out" in args else ["--out", "report.html"])])
    assert line.startswith(f"regexp: error: {message.format(**where)}"), line
    assert snapshot(tmp_path) == before and not (empty_cwd / "report.html").exists()


def test_out_is_required(sweep, capsys, empty_cwd):
    line = refused(capsys, ["report", str(sweep)])
    assert line == "regexp: error: report: the following arguments are required: --out (see regexp report --help)"
    assert list(empty_cwd.iterdir()) == []


def test_an_unwritable_out_is_one_line_exit_1_and_nothing_written(sweep, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    before = snapshot(tmp_path)
    code, out, err = report(capsys, [str(sweep), "--out", str(blocker / "report.html")])
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith(f"regexp: error: --out={blocker / 'report.html'}: output directory cannot be created: "
                          f"{blocker} is a file")
    assert snapshot(tmp_path) == before


def test_report_is_listed_in_help_and_the_unknown_command_line(capsys):
    from regexp import cli

    assert cli.main(["--help"]) == 0
    assert "report PATH... --out report.html" in capsys.readouterr().out
    assert "commands: train, compare, diagnose, report" in refused(capsys, ["reprot"])


# ---------------------------------------------------------------- in a real browser

MARK_IMAGES = ("<script>window.addEventListener('load', () => { for (const img of document.images) "
               "img.dataset.loaded = img.complete && img.naturalWidth > 0 ? 'yes' : 'no'; });</script>")


def chromium(args: list[str], page: Path, profile: Path) -> subprocess.CompletedProcess:
    """Headless chromium on a local file, with a profile of its own; no sandbox (CI containers run as root)."""
    command = [require_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
               *args, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.browser
def test_the_report_opens_in_headless_chromium_with_every_image(sweep, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "report.html"
    assert report(capsys, [str(sweep), "--out", str(out), "--baseline", "l2"])[0] == 0
    marked = tmp_path / "marked.html"  # the test's copy: the page itself holds no script
    marked.write_text(out.read_text().replace("</body>", MARK_IMAGES + "</body>"))
    dom = chromium(["--virtual-time-budget=10000", "--dump-dom"], marked, tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr
    assert "<h2>Comparison</h2>" in dom.stdout and "<td>dropout</td>" in dom.stdout
    loaded = re.findall(r'data-loaded="(\w+)"', dom.stdout)
    assert loaded == ["yes"] * 3, loaded

    shot = tmp_path / "shot.png"
    done = chromium([f"--screenshot={shot}", "--window-size=1280,1600", "--hide-scrollbars"], out, tmp_path / "profile")
    assert done.returncode == 0 and shot.is_file(), done.stderr
    colors = Image.open(shot).convert("RGB").getcolors(maxcolors=2**16)
    assert colors is None or len(colors) > 16  # text, tables and figures: not a blank page


@pytest.mark.slow
def test_a_missing_chromium_is_one_summary_line_outside_ci_and_fails_in_ci(tmp_path):
    import conftest

    tests = tmp_path / "repo" / "tests"
    tests.mkdir(parents=True)
    (tmp_path / "repo" / "pytest.ini").write_text("[pytest]\n")
    (tests / "conftest.py").write_text(Path(conftest.__file__).read_text())
    (tests / "test_pages.py").write_text("from conftest import require_chromium\n\n"
                                         "def test_a():\n    require_chromium()\n\ndef test_b():\n    require_chromium()\n")
    no_browser = tmp_path / "bin"  # a PATH without chromium
    no_browser.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PATH": str(no_browser)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)]
    out = subprocess.run(command, cwd=tests.parent, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert [line for line in out.stdout.splitlines() if line.startswith("browser:")] == [
        "browser: 2 tests skipped: chromium not found on PATH (apt-get install chromium)"]
    out = subprocess.run(command, cwd=tests.parent, env={**env, "CI": "true"}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "2 failed" in out.stdout and "browser:" not in out.stdout


# ---------------------------------------------------------------- end to end, through the real CLI

@pytest.mark.slow
def test_report_of_a_trained_sweep_through_the_cli(tmp_path):
    data_root = require_shared_data()
    sweep = tmp_path / "sweep"
    trained = run_cli(["train", "-m", "hydra/launcher=fused", "+regularizer=dropout,l2", "seed=0,1", *TINY,
                       "logger=none", f"hydra.sweep.dir={sweep}"], tmp_path, data_root)
    assert trained.returncode == 0, trained.stderr
    out = run_cli(["report", str(sweep), "--out", "report.html", "--baseline", "l2"], tmp_path)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.startswith("report: report.html (4 runs in 2 groups, ")
    page = (tmp_path / "report.html").read_text()
    assert "too few runs" in page  # 2 seeds a group: a difference, no p-value
    assert len(images(page)) == 3 and "<code>regularizer.dropout.p</code>" in page
