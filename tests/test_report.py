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
    """Two groups of three completed seeds (what bad input is checked against)."""
    root = tmp_path / "sweep"
    for seed in range(3):
        regularized_run(root, f"d{seed}", "dropout", seed, 0.95 + 0.002 * seed)
        regularized_run(root, f"l{seed}", "l2", seed, 0.93 + 0.003 * seed)
    return root


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """One report (figures cost seconds) of a sweep holding what a report must show: two groups of
    three completed seeds and a failed and a diverged run (listed, never averaged), a group with
    no completed run, a group whose median run's metrics.jsonl is corrupted, a finding, and run
    dirs, errors and group values that are HTML. The report replaces an earlier file."""
    import contextlib
    import io

    from regexp import cli

    tmp = tmp_path_factory.mktemp("report")
    root = tmp / "sweep"
    for seed in range(3):
        regularized_run(root, f"d{seed}", "dropout", seed, 0.95 + 0.002 * seed)
        regularized_run(root, f"l{seed}", "l2", seed, 0.93 + 0.003 * seed)
    regularized_run(root, HOSTILE_DIR, "dropout", 3, None, status="failed", error=HOSTILE_ERROR + "\nmore")
    regularized_run(root, "l3", "l2", 3, None, status="diverged", nonfinite={"nonfinite/step": 17})
    regularized_run(root, "i0", "<i>l1</i>", 0, None, status="diverged", nonfinite={"nonfinite/step": 3})
    corrupt = regularized_run(root, "m0", "max_norm", 0, 0.5, findings=[  # no diagnosis.json: its summary's findings
        {"rule": "loss_flat", "title": "Loss flat", "message": "the loss did not move", "step": 4}])
    (corrupt / "metrics.jsonl").write_text('{"step": 2, "train/loss": 1.0}\nnot json\n{"step": 4}\n')
    (root / "d1" / "diagnosis.json").write_text(json.dumps({"findings": [
        {"rule": "overfitting", "title": "Overfitting <b>x</b>", "message": "val loss rises", "step": 30,
         "evidence": {"metric": "val/loss", "values": [0.3, 0.5]}, "interventions": ["add dropout"]}]}))
    out = tmp / "report.html"
    out.write_text("old")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["report", str(root), "--out", str(out), "--baseline", "regularizer=l2"])
    return {"tmp": tmp, "sweep": root, "out": out, "code": code, "stdout": stdout.getvalue(),
            "stderr": stderr.getvalue(), "page": out.read_text()}


def images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)]


def section(page: str, heading: str) -> str:
    return re.split(f"<h2[^>]*>{re.escape(heading)}</h2>", page, maxsplit=1)[1].split("<h2", 1)[0]


# ---------------------------------------------------------------- the page

def test_report_holds_table_figures_config_and_every_run(made):
    sweep, page = made["sweep"], made["page"]
    assert made["code"] == 0, made["stderr"]
    assert made["stdout"].startswith(f"report: {made['out']} (10 runs in 4 groups, ") and made["stdout"].count("\n") == 1
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing from the network
    assert "<link" not in page and "@import" not in page and "url(" not in page
    rows = section(page, "Comparison").split("<tr")
    dropout = next(row for row in rows if "<td>dropout</td>" in row)
    assert "0.9520 ± 0.0020 (n=3)" in dropout  # the failed run is counted, not averaged
    assert "[0.9470, 0.9570]" in dropout  # the 95 % CI (Student's t, 2 degrees of freedom)
    assert "+0.0190" in dropout  # the difference of means to the baseline, then its p-value
    assert "baseline" in next(row for row in rows if "<td>l2</td>" in row)
    pngs = images(page)
    assert len(pngs) == 4 and all(png.startswith(PNG_SIGNATURE) for png in pngs)  # curves; dropout's, l2's, l1's health
    assert f"median run by test/acc (0.952, of 3 completed): <code>{sweep / 'd1'}</code>" in page  # seed 1 of 0, 1, 2
    assert '<a href="#group-1">regularizer=dropout</a>' in page and '<div class="group" id="group-1">' in page
    config = section(page, "Config keys that differ between groups")
    assert "<code>regularizer.dropout.p</code>" in config and "<code>regularizer.l2.coef</code>" in config
    assert "<code>seed</code>" not in config  # seeds are what a group averages over
    assert "<code>regularizer.dropout</code>" not in config  # null where not chosen: its keys' rows say it
    runs = section(page, "Runs")
    assert all(f"<code>{sweep / name}</code>" in runs for name in ("d0", "d1", "d2", "l0", "l1", "l2", "l3", "m0"))
    assert "RuntimeError: boom" in runs and "more" not in runs  # the error's first line
    assert "non-finite at step 17" in runs


def test_report_shows_each_median_runs_findings(made):
    page = made["page"]
    assert "<b>Overfitting &lt;b&gt;x&lt;/b&gt;</b> at step 30: val loss rises" in page
    assert "evidence: val/loss: 0.3, 0.5" in page and "try: add dropout" in page
    assert "no findings: nothing in the metrics matches a known failure" in page  # the l2 group's median run
    assert "<b>Loss flat</b> at step 4: the loss did not move</div>" in page


def test_report_escapes_every_text_from_runs(made):
    page = made["page"]
    assert "<script" not in page and "<img src=x" not in page and "<i>l1" not in page and "<b>x" not in page
    assert html.escape(HOSTILE_DIR) in page and "&lt;i&gt;l1&lt;/i&gt;" in page
    assert html.escape(HOSTILE_ERROR) in page


def test_a_group_without_a_figure_says_why(made):
    sweep, page = made["sweep"], made["page"]
    assert f"no health figure for {sweep / 'm0'}: {sweep / 'm0' / 'metrics.jsonl'}:2: not a JSON record" in made["stderr"]
    assert "no health figure: " in section(page, "Groups: health and findings")
    assert f"no completed run; shown: the longest run (diverged at step 3): <code>{sweep / 'i0'}</code>" in page
    assert f"regexp: warning: curves: leaving out {sweep / 'm0'}: " in made["stderr"] and "--plot" not in made["stderr"]
    assert f"left out, its records unreadable: <code>{sweep / 'm0'}</code>" in section(page, "Curves")


def test_report_replaces_an_earlier_file_whole(made):
    assert made["page"].startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in made["tmp"].iterdir()) == ["report.html", "sweep"]  # no temp file left beside it


def test_each_group_shows_a_run_and_each_unreadable_record_in_its_place(tmp_path, capsys):
    """A group whose runs all diverged shows its longest run's figure and findings; a non-median run
    whose metrics.jsonl is corrupted gets a line in its group; a run without metrics.jsonl says so."""
    from regexp import cli

    root = tmp_path / "sweep"
    regularized_run(root, "d0", "dropout", 0, 0.9)
    corrupt = regularized_run(root, "d1", "dropout", 1, 0.99)  # the upper middle: not the median run
    (corrupt / "metrics.jsonl").write_text("{bad\n{}\n")
    for seed, last in ((0, 12), (1, 30)):
        run_dir = regularized_run(root, f"l{seed}", "l2", seed, None, status="diverged",
                                  nonfinite={"nonfinite/step": last})
        kept = [r for r in log_records(seed) if r["step"] <= last]  # the longer run is l1
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    (root / "l1" / "diagnosis.json").write_text(json.dumps({"findings": [
        {"rule": "lr_too_high", "title": "Learning rate too high", "message": "the loss rose", "step": 8}]}))
    (regularized_run(root, "n0", "none", 0, 0.5) / "metrics.jsonl").unlink()
    assert cli.main(["report", str(root), "--out", str(tmp_path / "report.html")]) == 0
    err, page = capsys.readouterr().err, (tmp_path / "report.html").read_text()
    assert err == (f"regexp: warning: curves: leaving out {corrupt}: {corrupt / 'metrics.jsonl'}:1: not a JSON "
                   "record; the file is corrupted\n")
    groups = dict(re.findall(r'<div class="group" id="group-\d+"><h3>([^<]*)</h3>(.*?)</div>(?=<div class="group"|\n)',
                             section(page, "Groups: health and findings")))
    assert f"records unreadable, left out of the curves: <code>{corrupt}</code>" in groups["regularizer=dropout"]
    l2 = groups["regularizer=l2"]
    assert f"no completed run; shown: the longest run (diverged at step 30): <code>{root / 'l1'}</code>" in l2
    assert "<img " in l2 and "<b>Learning rate too high</b> at step 8: the loss rose" in l2
    assert "no findings: no metrics were recorded" in groups["regularizer=none"]
    assert f"left out, its records unreadable: <code>{corrupt}</code>" in section(page, "Curves")


# ---------------------------------------------------------------- refused inputs: one line, nothing written

@pytest.mark.parametrize("args,message", [
    (["{empty}"], "{empty}: no runs found (no readable summary.json in it or below it)"),
    (["{missing}"], "{missing}: no such directory"),
    (["{sweep}", "--by", "optimizer.momentum"], "--by optimizer.momentum: no run has this key"),
    (["{sweep}", "--baseline", "regularizer=l1"], "--baseline regularizer=l1: no such group; groups: "),
    (["{sweep}", "--metric", "test/accuracy"], "--metric test/accuracy: no run has this metric; available: "),
    (["{sweep}", "--out", "{sweep}"], "--out {sweep}: is a directory; name a file"),
    (["{sweep}", "--out", "{sweep}/d0/report.html"], "--out {sweep}/d0/report.html: inside the run dir {sweep}/d0,"),
    (["{sweep}", "--out", "report.png"], "--out report.png: unknown page format .png; use .html"),
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
    from regexp import cli

    code = cli.main(["report", str(sweep), "--out", str(blocker / "report.html")])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith(f"regexp: error: --out={blocker / 'report.html'}: output directory cannot be created: "
                          f"{blocker} is a file")
    assert snapshot(tmp_path) == before


def test_importing_the_report_module_imports_nothing_heavy():
    code = ("import sys, regexp.report; print(sorted(m for m in ('torch', 'wandb', 'matplotlib', 'scipy', 'hydra') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_report_is_listed_in_help_and_the_unknown_command_line(capsys):
    from regexp import cli

    assert cli.main(["--help"]) == 0
    assert "report PATH... --out report.html" in capsys.readouterr().out
    assert re.search(r"unknown command 'reprot'; commands: train, .*\breport\b", refused(capsys, ["reprot"]))


# ---------------------------------------------------------------- in a real browser

MARK_IMAGES = ("<script>window.addEventListener('load', () => { for (const img of document.images) "
               "img.dataset.loaded = img.complete && img.naturalWidth > 0 ? 'yes' : 'no'; });</script>")


def chromium(args: list[str], page: Path, profile: Path) -> subprocess.CompletedProcess:
    """Headless chromium on a local file, with a profile of its own; no sandbox (CI containers run as root)."""
    command = [require_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
               *args, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.browser
def test_the_report_opens_in_headless_chromium_with_every_image(made, tmp_path):
    from PIL import Image

    marked = tmp_path / "marked.html"  # the test's copy: the page itself holds no script
    marked.write_text(made["page"].replace("</body>", MARK_IMAGES + "</body>"))
    dom = chromium(["--virtual-time-budget=10000", "--dump-dom"], marked, tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr
    assert '<h2 id="comparison">Comparison</h2>' in dom.stdout and "<td>dropout</td>" in dom.stdout
    loaded = re.findall(r'data-loaded="(\w+)"', dom.stdout)
    assert loaded == ["yes"] * 4, loaded
    assert dom.stdout.count("<script") == 1  # the test's own: nothing from the runs became a script

    shot = tmp_path / "shot.png"
    done = chromium([f"--screenshot={shot}", "--window-size=1280,1600", "--hide-scrollbars"], made["out"],
                    tmp_path / "profile")
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


@pytest.mark.parametrize("folder", [".sweep", ".hydra"])
def test_a_sweeps_own_records_are_never_written_among(sweep, capsys, folder):
    (sweep / folder).mkdir()
    before = snapshot(sweep)
    line = refused(capsys, ["report", str(sweep), "--out", str(sweep / folder / "report.html")])
    assert line.endswith(f"inside {sweep / folder}, the records of a run or sweep; name a file outside it")
    assert snapshot(sweep) == before
