"""`xprune run` with the prune experiment, on a tiny budget: every (criterion, mode, budget) row is
produced, and the report states exactly the numbers in results.json."""

import json

from tests.test_cli import xprune


def test_prune_pipeline_end_to_end(tmp_path):
    out = tmp_path / "run"
    xprune("run", "--config=configs/structural.py:shufflenet_v2_x0_5",
           "--config.criteria=('grad_x_act', 'l1')", "--config.prunings=('zero:layers=5%', 'remove:flops=-10%', 'shrink:flops=-10%')",
           "--config.bench.repeats=2", "--config.bench.warmup=1", "--config.calib_images=2", f"--config.out_dir={out}")
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert {(r["criterion"], r["mode"]) for r in rows} == {(c, m) for c in ("grad_x_act", "l1") for m in ("zero", "remove", "shrink")}
    report = (out / "report.md").read_text()
    for r in rows:
        assert r["flops_ratio"] == 1.0 if r["mode"] == "zero" else r["flops_ratio"] <= 0.9
        line = (f"| {r['criterion']} | {r['mode']} | {r['budget']} | {r['seed']} | {len(r['selected'])} | "
                f"{r['top1_agreement']:.1%} | {r['flops_ratio']:.3f} | {r['params_ratio']:.3f} | {r['latency_ratio']:.3f}")
        assert line in report, line
    scores = json.loads((out / "scores" / "seed0.json").read_text())
    assert scores["calibration"]["seed"] == 0 and len(scores["calibration"]["images"]) == 2
    for plot in ("layer_scores.png", "criteria_ranks.png", "tradeoff.png"):
        assert (out / "plots" / plot).stat().st_size > 10_000
