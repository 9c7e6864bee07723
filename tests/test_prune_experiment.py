"""`xprune run` with the prune experiment, on a tiny budget: every (criterion, mode, budget) row is
produced, and the report states exactly the numbers in results.json."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from tests.conftest import REPO
from tests.test_cli import xprune
from xprune_jax import runs
from xprune_jax.errors import UserError
from xprune_jax.experiments import prune
from xprune_jax.experiments.prune import Measurements, _report, format_metric, read_measurements, summarize


def assert_report_holds_results(report: str, results: dict) -> None:
    """Every run's row, every summary cell and every verdict of the report come from results.json:
    a single seed shows no spread, and every criterion that ties the best as printed is bold."""
    metric = results["metric"]
    fmt = lambda value: format_metric(metric, value)  # noqa: E731
    for r in results["rows"]:
        if "infeasible" in r:
            assert f"| {r['criterion']} | {r['mode']} | {r['budget']} | {r['seed']} | - | infeasible: " in report
            continue
        line = (f"| {r['criterion']} | {r['mode']} | {r['budget']} | {r['seed']} | {len(r['selected'])} | "
                f"{fmt(r['metrics'][metric])} | {r['flops_ratio']:.3f} | {r['params_ratio']:.3f} | "
                f"{r['latency_ratio']:.3f} [{r['latency_ratio_iqr'][0]:.3f}, {r['latency_ratio_iqr'][1]:.3f}] |")
        assert line in report, line
    for s in results["summary"]:
        same_cell = [t for t in results["summary"] if (t["mode"], t["budget"]) == (s["mode"], s["budget"])]
        best = fmt(s["metric_mean"]) == fmt(max(t["metric_mean"] for t in same_cell))
        value = fmt(s["metric_mean"])
        if s["n"] > 1 and fmt(s["metric_std"]) != fmt(0.0):
            value += f" ± {fmt(s['metric_std'])}"
        line = (f"| {s['mode']} | {s['budget']} | {s['criterion']} | {s['n']} | {'**' + value + '**' if best else value} | "
                f"{s['flops_ratio']:.3f} | {s['params_ratio']:.3f} | {s['latency_ratio']:.3f} |")
        assert line in report, line
        assert s["best"] == best
        runs = [r for r in results["rows"] if "infeasible" not in r and (r["mode"], r["budget"], r["criterion"]) ==
                (s["mode"], s["budget"], s["criterion"])]
        assert s["n"] == len(runs) and abs(s["metric_mean"] - sum(r["metrics"][metric] for r in runs) / len(runs)) < 1e-12
    for mode, budget in {(s["mode"], s["budget"]) for s in results["summary"]}:
        cell = sorted((s for s in results["summary"] if (s["mode"], s["budget"]) == (mode, budget)), key=lambda s: s["criterion"])
        top = fmt(max(s["metric_mean"] for s in cell))
        best = [s["criterion"] for s in cell if fmt(s["metric_mean"]) == top]
        assert (f"- `{mode}` at {budget}: best is `{best[0]}` ({top})." if len(best) == 1 else
                f"- `{mode}` at {budget}: best are {', '.join(f'`{c}`' for c in best)}, tied at {top}.") in report
    assert f"{metric} {fmt(results['unpruned']['metrics'][metric])}, latency {results['unpruned']['latency_ms']:.2f} ms" in report


def assert_progress_follows_the_work(stderr: str, total: int) -> None:
    """``xprune run`` says what it does before each slow step, and its bar counts a pruned model only
    once it is measured: a model being measured is shown with fewer than ``total`` done."""
    assert "prune: evaluating the unpruned model on " in stderr, stderr[-2000:]
    assert re.search(r"seed 0: scoring \d+ images with grad_x_act, l1", stderr), stderr[-2000:]
    updates = [re.match(r"(.*?): +\d+%\|.*\| (\d+)/(\d+) ", line) for line in re.split(r"[\r\n]", stderr)]
    updates = [(m.group(1), int(m.group(2))) for m in updates if m and int(m.group(3)) == total]
    first_shown = {}
    for description, done in updates:
        first_shown.setdefault(description, done)
    measuring = {d: done for d, done in first_shown.items() if ": measuring " in d}
    assert measuring and all(done < total for done in measuring.values()), first_shown
    assert updates[-1][1] == total
    assert stderr.index("prune: writing the plots and the report") > stderr.rindex(f" {total}/{total} ")


SMALL_RUN = ("run", "--config=configs/structural.py:shufflenet_v2_x0_5", "--config.criteria=('grad_x_act', 'l1')",
             "--config.bench.repeats=2", "--config.bench.warmup=1", "--config.calib_images=2", "--config.seeds=(0, 1)")


def test_prune_pipeline_end_to_end_then_a_longer_table_from_its_measurements(tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = xprune(*SMALL_RUN, "--config.prunings=('zero:layers=5%', 'remove:flops=-10%', 'shrink:flops=-10%')",
                   f"--config.out_dir={out}")
    assert_progress_follows_the_work(first.stderr, total=2 * 2 * 3)
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert {(r["criterion"], r["mode"], r["seed"]) for r in rows} == \
        {(c, m, s) for c in ("grad_x_act", "l1") for m in ("zero", "remove", "shrink") for s in (0, 1)}
    l1 = {(r["mode"], r["seed"]): r for r in rows if r["criterion"] == "l1"}
    for mode in ("zero", "remove", "shrink"):  # l1 ignores the calibration images: the seed-0 measurement is reused
        assert l1[mode, 0]["selected"] == l1[mode, 1]["selected"] and l1[mode, 0]["latency_ratio"] == l1[mode, 1]["latency_ratio"]
    assert results["metric"] == "top1_agreement" and results["unpruned"]["metrics"]["top1_agreement"] == 1.0
    for r in rows:
        assert r["flops_ratio"] == 1.0 if r["mode"] == "zero" else r["flops_ratio"] <= 0.9
    assert_report_holds_results((out / "report.md").read_text(), results)
    scores = json.loads((out / "scores" / "seed0.json").read_text())
    layers = [l for l in scores["layers"] if l["kind"] != "block"]  # the plotted entries: blocks repeat their layers
    assert len(layers) < len(scores["layers"]) and [c["layers"] for c in results["comparison"]] == [len(layers)]
    assert f"Criteria agreement (first seed, over the {len(layers)} scored layers;" in (out / "report.md").read_text()
    assert scores["calibration"]["seed"] == 0 and len(scores["calibration"]["images"]) == 2
    assert json.loads((out / "scores" / "seed1.json").read_text())["calibration"]["images"] != scores["calibration"]["images"]
    for plot in ("layer_scores.png", "criteria_ranks.png", "tradeoff.png"):
        assert (out / "plots" / plot).stat().st_size > 10_000

    # A longer table run in another folder from that run's measurements (how a stopped or split table is
    # gathered; resume=True reads the same file in the same folder) measures only what is new: every
    # earlier row comes back unchanged (its latency ratio, a noisy measurement, too), the new budget is
    # measured, and the new folder's measurements.json holds both. (The new budget zeroes layers: it runs
    # the programs already compiled.)
    entries = json.loads((out / "measurements.json").read_text())["entries"]
    gathered_dir = tmp_path / "gathered"
    gathered = xprune(*SMALL_RUN, "--config.prunings=('zero:layers=5%', 'remove:flops=-10%', 'shrink:flops=-10%', "
                      "'zero:layers=10%')", f"--config.out_dir={gathered_dir}",
                      f"--config.measurements_from=('{out / 'measurements.json'}',)")
    again = json.loads((gathered_dir / "results.json").read_text())
    assert f"resumed: {len(entries)} of " in gathered.stdout
    by_cell = {(r["criterion"], r["mode"], r["budget"], r["seed"]): r for r in again["rows"]}
    for r in rows:
        assert by_cell[r["criterion"], r["mode"], r["budget"], r["seed"]] == r
    new = [r for r in again["rows"] if r["budget"] == "layers=10%"]
    assert len(new) == 4
    for r in new:  # twice the layers of the 5% rows
        assert r["mode"] == "zero" and len(r["selected"]) > len(by_cell[r["criterion"], "zero", "layers=5%", r["seed"]]["selected"])
    assert again["unpruned"]["metrics"] == results["unpruned"]["metrics"]
    gathered_entries = json.loads((gathered_dir / "measurements.json").read_text())["entries"]
    assert {k: v for k, v in gathered_entries.items() if k in entries} == entries and len(gathered_entries) > len(entries)
    assert_report_holds_results((gathered_dir / "report.md").read_text(), again)

    # A run that stops with an error leaves a finished run's folder as it was: its config and environment
    # still describe its results (here the measurements to reuse were made with another eval_images).
    made = json.loads((out / "measurements.json").read_text())
    other = tmp_path / "other_measurements.json"
    other.write_text(json.dumps({**made, "context": {**made["context"], "eval_images": 7}}))
    recorded = {name: (gathered_dir / name).read_bytes() for name in ("config.json", "environment.json", "results.json")}
    failed = xprune(*SMALL_RUN, f"--config.out_dir={gathered_dir}", f"--config.measurements_from=('{other}',)", check=False)
    assert failed.returncode == 2 and "they were made with another eval_images (7 there, " in failed.stderr, failed.stderr[-2000:]
    assert "evaluating the unpruned model" not in failed.stderr  # refused before the long work
    assert {name: (gathered_dir / name).read_bytes() for name in recorded} == recorded

    # So does one that stops after it scored and saved models (staged, moved in only by a run that finishes,
    # else removed); the run that then finishes there saves every row's model, a resumed measurement's too.
    files = lambda: {str(p.relative_to(gathered_dir)): p.read_bytes()  # noqa: E731
                     for p in sorted(gathered_dir.rglob("*")) if p.is_file()}
    before, staged = files(), []
    extend = (*[a for a in SMALL_RUN if not a.startswith("--config.criteria=")], "--config.criteria=('l1',)",
              "--config.prunings=('zero:layers=5%', 'zero:layers=20%')",
              "--config.resume=True", "--config.save_models=True", f"--config.out_dir={gathered_dir}")

    def fail(*args, **kwargs):
        staged.extend(gathered_dir.glob(f"{runs.NEXT}*/scores/seed0.json"))
        raise UserError("stopped by the test")

    with monkeypatch.context() as patched:
        patched.setattr(prune, "apply_plan", fail)
        failed = xprune(*extend, check=False)
    assert failed.returncode == 2 and "stopped by the test" in failed.stderr, failed.stderr[-2000:]
    assert files() == before and staged
    xprune(*extend)
    extended = json.loads((gathered_dir / "results.json").read_text())
    assert not list(gathered_dir.glob(f"{runs.NEXT}*")) and {r["criterion"] for r in extended["rows"]} == {"l1"}
    assert json.loads((gathered_dir / "scores" / "seed0.json").read_text())["criteria"] == ["l1"]
    for budget in ("layers5pct", "layers20pct"):
        for seed in (0, 1):
            assert (gathered_dir / "models" / f"l1_zero_{budget}_seed{seed}" / "model.json").is_file()
    assert json.loads((gathered_dir / "config.json").read_text())["criteria"] == ["l1"]
    assert runs.NEXT not in json.dumps(extended) and runs.NEXT not in (gathered_dir / "report.md").read_text()


def test_resume_refuses_other_measurements(tmp_path, capsys):
    path = str(tmp_path / "measurements.json")
    context = {"weights_sha256": "ab", "eval_images": 50, "unpruned_metrics": {"AP": 0.5}}
    assert Measurements(path, context, resume=True).get("plan") is None  # nothing to resume: said, not silent
    assert f"resume: no {path} yet" in capsys.readouterr().out
    Measurements(path, context, resume=False).put("plan", {"metrics": {"AP": 0.4}, "latency": {"ratio_median": 0.9}})
    assert Measurements(path, context, resume=True).get("plan")["metrics"] == {"AP": 0.4}
    assert Measurements(path, context, resume=False).get("plan") is None  # a fresh run measures everything again
    with pytest.raises(UserError, match=r"another eval_images \(50 there, 10 here\), weights_sha256 \(ab there, cd "
                                         r"here\); reuse only runs of the same"):
        Measurements(path, {**context, "weights_sha256": "cd", "eval_images": 10}, resume=True)
    with pytest.raises(UserError, match=r"another unpruned_metrics.AP \(0.5 there, 0.6321 here\);"):  # nested, rounded
        Measurements(path, {**context, "unpruned_metrics": {"AP": 0.632144}}, resume=True)
    long = {**context, "weights_sha256": "7babee721203a72cc2f1", "spec": {"widths": [1]}}
    with pytest.raises(UserError, match=r"another spec, weights_sha256 \(ab there, 7babee72\.\.\. here\);"):
        Measurements(path, long, resume=True)  # a list by name only, a sha256 shortened
    assert read_measurements(path, {**context, "unpruned_metrics": {}}, ignore=("unpruned_metrics",)) == \
        {"plan": {"metrics": {"AP": 0.4}, "latency": {"ratio_median": 0.9}}}  # what a run checks before evaluating
    for broken in ('{"context": ', '{"context": [], "entries": {}}', '[]'):
        (tmp_path / "measurements.json").write_text(broken)
        with pytest.raises(UserError, match="unreadable"):
            Measurements(path, context, resume=True)


def test_measurements_from_gathers_a_split_table(tmp_path, capsys):
    """A table split over processes (by criteria or seeds) is gathered by a last run that reuses
    every part's measurements, keeps them all in its own file, and refuses parts made otherwise."""
    context = {"weights_sha256": "ab", "eval_images": 50, "unpruned_metrics": {"AP": 0.5}}
    parts = []
    for i, key in enumerate(("plan_a", "plan_b")):
        parts.append(str(tmp_path / f"part{i}" / "measurements.json"))
        (tmp_path / f"part{i}").mkdir()
        Measurements(parts[-1], context, resume=False).put(key, {"metrics": {"AP": 0.1 * (i + 1)}})
    path = str(tmp_path / "measurements.json")
    resumed = Measurements(path, context, resume=True, sources=(parts[0],))  # a first resume says what it reuses
    assert resumed.get("plan_a") and f"resume: no {path} yet, so only plans in {parts[0]} are reused" in capsys.readouterr().out
    gathered = Measurements(path, context, resume=False, sources=tuple(parts))
    assert gathered.get("plan_a")["metrics"] == {"AP": 0.1} and gathered.get("plan_b")["metrics"] == {"AP": 0.2}
    assert gathered.get("plan_c") is None and gathered.resumed == 2
    gathered.save()  # what the experiment does at its end, even when it measured nothing new
    assert set(json.loads((tmp_path / "measurements.json").read_text())["entries"]) == {"plan_a", "plan_b"}
    gathered.put("plan_c", {"metrics": {"AP": 0.3}})
    assert set(json.loads((tmp_path / "measurements.json").read_text())["entries"]) == {"plan_a", "plan_b", "plan_c"}
    with pytest.raises(UserError, match=r"part1/measurements.json: they were made with another eval_images"):
        Measurements(path, {**context, "eval_images": 100}, resume=False, sources=(parts[1],))
    with pytest.raises(UserError, match=r"no such file"):
        Measurements(path, context, resume=False, sources=(str(tmp_path / "missing.json"),))


def _put_many(path, context, prefix, n, barrier):
    measurements = Measurements(path, context, resume=True)
    barrier.wait(30)  # both have read the file before either writes
    for i in range(n):
        measurements.put(f"{prefix}{i}", {"metrics": {"AP": i / n}})


def test_resuming_processes_share_one_measurements_file(tmp_path):
    """Two processes resuming from one file (bench_peers' cache, a table split by budget) each write
    after every measurement; neither loses the other's, and a fresh run (no resume) still starts over."""
    import multiprocessing

    path, context = str(tmp_path / "measurements.json"), {"weights_sha256": "ab", "unpruned_metrics": {"AP": 0.5}}
    fork = multiprocessing.get_context("fork")
    barrier = fork.Barrier(2)
    processes = [fork.Process(target=_put_many, args=(path, context, p, 40, barrier)) for p in "ab"]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
    assert [p.exitcode for p in processes] == [0, 0]
    assert set(json.loads((tmp_path / "measurements.json").read_text())["entries"]) == \
        {f"{p}{i}" for p in "ab" for i in range(40)}
    resumed = Measurements(path, context, resume=True)
    assert "a0" in resumed and "b39" in resumed and "c" not in resumed and resumed.resumed == 0  # asking reuses nothing
    Measurements(path, context, resume=False).put("c", {"metrics": {"AP": 0.1}})
    assert set(json.loads((tmp_path / "measurements.json").read_text())["entries"]) == {"c"}
    assert not list(tmp_path.glob("*.lock")) and not list(tmp_path.glob("*.tmp*"))


def test_report_bolds_every_tie_as_printed_and_shows_no_spread_for_one_seed():
    """0.2801 and 0.2799 both print as 0.280: both are the best, and the paper's criterion ties with
    L1 there. A single seed prints its value alone; two seeds that differ print their spread."""
    def row(criterion, seed, ap):
        return {"criterion": criterion, "mode": "shrink", "budget": "flops=-20%", "seed": seed, "selected": ["a"],
                "metrics": {"AP": ap}, "flops_ratio": 0.8, "params_ratio": 0.7, "latency_ratio": 0.9,
                "latency_ratio_iqr": [0.85, 0.95]}
    rows = [row("grad_x_act", 0, 0.2801), row("l1", 0, 0.2799), row("random", 0, 0.05), row("random", 1, 0.07)]
    summary = summarize(rows, "AP")
    assert {s["criterion"] for s in summary if s["best"]} == {"grad_x_act", "l1"}
    results = {"arch": "yolov8n", "weights": "w.pt", "metric": "AP", "metric_description": "AP", "comparison": [],
               "unpruned": {"metrics": {"AP": 0.3}, "latency_ms": 10.0}, "rows": rows, "summary": summary}
    config = ml_collections.ConfigDict({"seeds": (0, 1), "calib_images": 4,
                                        "bench": {"batch_size": 1, "repeats": 2, "warmup": 1}})
    report = _report(results, config)
    assert report.count("**0.280**") == 2 and "± 0.000" not in report and "0.060 ± 0.014" in report
    assert "best are `grad_x_act`, `l1`, tied at 0.280." in report
    assert "The paper's `grad_x_act` ties with `l1` (0.280 vs 0.280" in report
    assert_report_holds_results(report, results)


def test_recovery_stage_is_measured_and_reported(tmp_path):
    """config.recovery: every pruned model is measured as cut, after BN recalibration on training images
    and after a few fine-tuning steps from the unpruned model; the report puts them side by side and the
    measurements' context records the settings (so a resume with other recovery settings is refused).
    With the task loss in the objective the unpruned model is recovered alike, once, as the reference.
    Fine-tuning shows its steps under the run's bar, the reference's and each pruned model's."""
    out = tmp_path / "run"
    args = ("run", "--config=configs/structural.py:shufflenet_v2_x1_0",
            "--config.weights=benchmarks/fixtures/shufflenet_v2_x1_0_shapes.pth",
            "--config.image_folder=xprune_jax/data/demo_shapes/classification", "--config.criteria=('random',)",
            "--config.prunings=('shrink:flops=-50%',)", "--config.calib_images=8", "--config.batch_size=8",
            "--config.bench.repeats=2", "--config.bench.warmup=1", "--config.recovery.recalibrate_bn=16",
            "--config.recovery.finetune.steps=4", "--config.recovery.finetune.batch_size=8",
            "--config.recovery.finetune.objective=distill=1,task=1", f"--config.out_dir={out}")
    stderr = xprune(*args).stderr
    for shown in (r"finetune:\s+0%\|[^|]*\| 0/4 \[", r"finetune:\s+25%\|[^|]*\| 1/4 \[[^\]]*step[^\]]*loss="):  # the first step
        assert len(re.findall(shown, stderr)) == 2, stderr[-2000:]  # takes seconds (compiles), so it is drawn
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert results["metric"] == "top1"
    for r in results["rows"]:
        recovered = r["recovery"]
        assert set(recovered) == {"recalibrated", "finetuned"} and recovered["finetuned"]["steps"] == 4
        assert recovered["finetuned"]["metrics"]["top1"] != r["metrics"]["top1"] or \
            recovered["recalibrated"]["metrics"]["top1"] != r["metrics"]["top1"]  # recovery changed the model
    for s in results["summary"]:
        fmt = lambda c: format_metric("top1", c["metric_mean"])  # noqa: E731
        assert s["recalibrated"]["n"] == s["finetuned"]["n"] == 1
        assert f"| shrink | flops=-50% | {s['criterion']} | 1 | " in report
        assert fmt(s["finetuned"]) in report and fmt(s["recalibrated"]) in report
    assert "## After recovery" in report and "16 training images" in report and "4 steps of batch 8" in report
    assert "Does recovery change which criterion wins?" in report
    measurements = json.loads((out / "measurements.json").read_text())
    context = measurements["context"]
    assert context["recovery"]["finetune"]["steps"] == 4 and context["recovery"]["recalibrate_bn"] == 16
    reference = results["unpruned"]["recovery"]
    assert reference == measurements["entries"]["unpruned"]["recovery"] and reference["finetuned"]["steps"] == 4
    assert results["unpruned"]["latency_ms"] > 0  # the reference entry has no latency and is left out of it
    alike = format_metric("top1", reference["finetuned"]["metrics"]["top1"])
    assert f"The unpruned model recovered alike reaches {alike}" in report and "| of unpruned fine-tuned alike |" in report
    for s in results["summary"]:
        share = s["finetuned"]["metric_mean"] / reference["finetuned"]["metrics"]["top1"]
        assert f" | {share:.1%} | " in report


def test_a_stopped_recovery_resumes_its_fine_tuning_from_its_checkpoints(tmp_path):
    """With resume=True each fine-tuning checkpoints into out_dir/checkpoints/KEY: a run killed part-way
    through one resumes it from there (``resumed_from`` says where), measures what a run never stopped
    measures, and leaves no checkpoints behind."""
    args = ("run", "--config=configs/structural.py:shufflenet_v2_x1_0",
            "--config.weights=benchmarks/fixtures/shufflenet_v2_x1_0_shapes.pth",
            "--config.image_folder=xprune_jax/data/demo_shapes/classification", "--config.criteria=('l1',)",
            "--config.prunings=('shrink:flops=-50%',)", "--config.batch_size=8", "--config.bench.repeats=2",
            "--config.bench.warmup=1", "--config.recovery.finetune.steps=8", "--config.recovery.finetune.batch_size=8",
            "--config.recovery.finetune.checkpoint_every=2")
    stopped, log = tmp_path / "stopped", tmp_path / "stopped.log"  # a file: a pipe nobody reads fills and blocks
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "xprune_jax", *args, f"--config.out_dir={stopped}",
                                    "--config.resume=True", f"--cache_dir={REPO / '.cache' / 'jax'}"],
                                   stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO,
                                   env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"})
    deadline = time.time() + 600
    while not any(step.name.isdigit() for step in (stopped / prune.CHECKPOINTS).glob("*/*")):
        assert process.poll() is None, log.read_text()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (stopped / "results.json").exists()
    xprune(*args, f"--config.out_dir={stopped}", "--config.resume=True")
    whole = tmp_path / "whole"
    xprune(*args, f"--config.out_dir={whole}")
    (resumed,), (uninterrupted,) = (json.loads((out / "results.json").read_text())["rows"] for out in (stopped, whole))
    assert resumed["recovery"]["finetuned"]["resumed_from"] % 2 == 0 and "resumed_from" not in uninterrupted["recovery"]["finetuned"]
    assert resumed["recovery"]["finetuned"]["metrics"] == uninterrupted["recovery"]["finetuned"]["metrics"]
    assert resumed["recovery"]["finetuned"]["final_loss"] == pytest.approx(uninterrupted["recovery"]["finetuned"]["final_loss"],
                                                                          rel=1e-5)
    assert not any((stopped / prune.CHECKPOINTS).iterdir()) and not (whole / prune.CHECKPOINTS).exists()


def test_tradeoff_plot_marks_every_mode(tmp_path):
    """Rows of every pruning mode (remove+shrink and auto included) plot, each mode with its own marker."""
    from xprune_jax.experiments.prune import _plot_tradeoff
    from xprune_jax.pruning.plan import MODES

    rows = [{"mode": mode, "criterion": criterion, "latency_ratio": 0.5 + i / 10, "flops_ratio": 0.4 + i / 10,
             "metrics": {"AP": 0.1 * i}} for i, mode in enumerate((*MODES, "auto")) for criterion in ("l1", "random")]
    path = tmp_path / "tradeoff.png"
    _plot_tradeoff(rows, "AP", str(path))
    assert path.stat().st_size > 0


def test_latency_priced_run_measures_its_table_once(tmp_path):
    """`config.pruning.latency_price` prices the run's shrink plans by a layer latency table measured
    once into the run folder and reused on resume (the same rows, nothing measured again); `remove`
    rows plan unpriced; `auto` plans priced too, and shares the measurement of the plan it chose (here
    its one candidate is the shrink row's); bad settings get one line before any work."""
    out = tmp_path / "run"
    prunings = "--config.prunings=('remove:flops=-10%', 'shrink:flops=-20%', 'auto:flops=-20%')"
    priced = ("run", "--config=configs/structural.py:shufflenet_v2_x0_5", "--config.criteria=('l1',)", "--config.seeds=(0,)",
              "--config.bench.repeats=2", "--config.bench.warmup=1", "--config.calib_images=2", "--config.pruning.latency_price=0.5")
    first = xprune(*priced, prunings, "--config.pruning.candidates=('shrink:mean',)", f"--config.out_dir={out}")
    assert "measuring each layer's latency for latency_price" in first.stderr
    table = json.loads((out / "layer_latency.json").read_text())
    assert table["arch"] == "shufflenet_v2_x0_5" and len(table["layers"]) > 20
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["mode"], "infeasible" in r) for r in rows] == [("remove", False), ("shrink", False), ("auto", False)]
    assert rows[1]["flops_ratio"] <= 0.8 and rows[2]["selected"] == rows[1]["selected"]
    assert [(c["mode"], c["normalize"]) for c in rows[2]["selection"]["candidates"]] == [("shrink", "mean")]
    assert rows[2]["selection"]["candidates"][0]["loss"] > 0 and "selection" not in rows[1]
    context = json.loads((out / "measurements.json").read_text())["context"]
    assert context["pruning"]["latency_price"] == 0.5
    again = xprune(*priced, prunings, "--config.pruning.candidates=('shrink:mean',)", f"--config.out_dir={out}",
                   "--config.resume=True")
    assert "measuring each layer's latency" not in again.stderr and "resumed: 2 of 2" in again.stdout
    assert json.loads((out / "results.json").read_text())["rows"] == rows
    for flags, message in ((("--config.pruning.latency_price=-1.0",), "config.pruning.latency_price is -1.0"),
                           (("--config.pruning.latency_price=0.5", "--config.pruning.allocation=layer"),
                            "prices channels in the global allocation"),
                           (("--config.pruning.layer_latency=/nonexistent.json",), "set config.pruning.latency_price too"),
                           (("--config.pruning.latency_price=0.5", "--config.pruning.layer_latency=/nonexistent.json"),
                            "no file /nonexistent.json")):
        result = xprune(*priced[:-1], prunings, *flags, f"--config.out_dir={tmp_path / 'bad'}", check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and message in lines[-1] and "Traceback" not in result.stderr, result.stderr[-2000:]
