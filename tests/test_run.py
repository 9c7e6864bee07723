"""`xprune run` end to end on the README's demo config (one small architecture to stay fast): the
run folder holds the report, the results, the plots, the config and the environment, and the report
states exactly the numbers in results.json."""

import json
import os

from tests.test_cli import xprune


def test_demo_parity_run(tmp_path):
    out = tmp_path / "run"
    xprune("run", "--config=configs/parity.py", "--config.archs=('shufflenet_v2_x0_5',)", f"--config.out_dir={out}")
    results = json.loads((out / "results.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["archs"] == ["shufflenet_v2_x0_5"] and config["seed"] == 0 and config["precision"] == "highest"
    environment = json.loads((out / "environment.json").read_text())
    assert "jax" in environment and environment["precision"] == "highest"
    assert environment["cpus_usable"] == len(os.sched_getaffinity(0))  # fine-tuned numbers depend on it
    r = results["shufflenet_v2_x0_5"]
    assert r["images"] == 4 and r["layers_compared"] > 50
    assert r["worst_layer_relative_error"] < 1e-4 and r["logits_relative_error"] < 1e-4
    assert r["top1_agreement"] == 1.0
    report = (out / "report.md").read_text()
    assert f"`{r['worst_layer']}` | {r['worst_layer_relative_error']:.1e} | {r['logits_relative_error']:.1e}" in report
    assert (out / "plots" / "parity_shufflenet_v2_x0_5.png").stat().st_size > 10_000
    assert list(r["layer_relative_errors"])[0] == "conv1.0"  # listed in execution (depth) order


def test_demo_prunes_the_trained_yolov8n_fixture(tmp_path):
    """The README's main command on a tiny budget: the committed YOLOv8n fixture, the bundled shapes
    images, two criteria, the paper's `zero` and one structural mode. The unpruned AP comes from
    the model's own detections and shows a network that learned; the report holds every number."""
    from tests.test_prune_experiment import assert_report_holds_results

    out = tmp_path / "run"
    xprune("run", "--config=configs/demo.py", "--config.criteria=('grad_x_act', 'random')",
           "--config.prunings=('zero:layers=5%', 'shrink:flops=-20%')", "--config.bench.repeats=2",
           "--config.bench.warmup=1", "--config.calib_images=4", f"--config.out_dir={out}")
    results = json.loads((out / "results.json").read_text())
    assert results["arch"] == "yolov8n" and results["metric"] == "AP"
    assert results["unpruned"]["metrics"]["AP"] > 0.4
    rows = results["rows"]
    assert {(r["criterion"], r["mode"]) for r in rows} == {(c, m) for c in ("grad_x_act", "random") for m in ("zero", "shrink")}
    for r in rows:
        assert "infeasible" not in r, r
        assert r["flops_ratio"] == 1.0 if r["mode"] == "zero" else r["flops_ratio"] <= 0.8
    assert_report_holds_results((out / "report.md").read_text(), results)
    assert (out / "plots" / "tradeoff.png").stat().st_size > 10_000


def test_configs_build_on_each_other():
    """Every config file loads for every fixture it names, and one built on another (demo and recovery on
    fixtures, fixtures and the paper's protocol on structural) keeps its base's fields and changes only its own,
    without touching the base's later configs."""
    import os

    from xprune_jax.runs import config_module

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    fixtures, recovery = (config_module(os.path.join(configs, f"{n}.py")) for n in ("fixtures", "recovery"))
    assert set(recovery.FINETUNE_STEPS) == set(fixtures.FIXTURES)
    for arch, weights in fixtures.FIXTURES.items():
        base, recovered = fixtures.get_config(arch), recovery.get_config(arch)
        assert base.weights == recovered.weights == weights and base.experiment == "prune"
        assert (base.pruning.allocation, recovered.pruning.allocation) == ("layer", "global")
        assert recovered.recovery.finetune.steps == recovery.FINETUNE_STEPS[arch] and base.recovery.finetune.steps != \
            recovered.recovery.finetune.steps
        assert base.criteria != recovered.criteria and base.seeds == recovered.seeds == (0, 1, 2)
    demo = config_module(os.path.join(configs, "demo.py")).get_config()
    assert demo.arch == "yolov8n" and demo.weights == fixtures.FIXTURES["yolov8n"] and demo.seeds == (0,)
    paper = config_module(os.path.join(configs, "paper_protocol.py")).get_config("mobilenet_v2")
    structural = config_module(os.path.join(configs, "structural.py")).get_config("mobilenet_v2")
    assert paper.prunings == ("zero:layers=5%",) and structural.prunings != paper.prunings
    assert (paper.arch, paper.weights, paper.criteria) == (structural.arch, structural.weights, structural.criteria)
