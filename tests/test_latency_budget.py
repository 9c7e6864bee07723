"""The measured-latency budget: the search finds the smallest FLOPs cut that meets the target under a
known latency model, refuses what can't be met, and runs end to end through `xprune prune`."""

import json

import pytest

from tests.test_cli import ARCH, workdir, xprune  # noqa: F401 (workdir: a pytest fixture)
from xprune_jax import analysis, models
from xprune_jax.attribution.score import score_model
from xprune_jax.checkpoint import Model
from xprune_jax.errors import UserError
from xprune_jax.pruning.latency import parse_latency_budget, plan_for_latency


@pytest.fixture(scope="module")
def model_and_scores():
    spec = models.get_architecture("mobilenet_v2").default_spec()
    model = Model("mobilenet_v2", spec, models.init_variables("mobilenet_v2", spec, seed=0), {"preprocess": {"crop": 224}})
    return model, score_model(model, ["l1"], progress=False)


def _flops_ratio(model, pruned) -> float:
    flops = lambda m: analysis.total_flops(analysis.describe_layers(m.arch, m.spec, 224))  # noqa: E731
    return flops(pruned) / flops(model)


def test_search_finds_the_smallest_cut_that_meets_the_target(model_and_scores):
    """Under latency = FLOPs ** 0.6, -15% latency needs at least a 23.7% FLOPs cut."""
    model, scores = model_and_scores
    measured = []

    def measure(pruned):
        measured.append(_flops_ratio(model, pruned) ** 0.6)
        return measured[-1]

    plan, steps = plan_for_latency(model, scores, "shrink", 0.15, measure)
    cut = 1 - plan.flops_after / plan.flops_before
    needed = 1 - 0.85 ** (1 / 0.6)
    assert plan.budget == "latency=-15%" and plan.mode == "shrink"
    assert needed <= cut < needed + 0.03, (cut, steps)
    assert [s["latency_ratio"] for s in steps if "latency_ratio" in s] == measured
    assert any(not s["met"] for s in steps) and any(s["met"] for s in steps)  # the bracket closed from both sides


def test_unmeetable_targets_and_zero_mode_are_refused(model_and_scores):
    model, scores = model_and_scores
    with pytest.raises(UserError, match="latency=-30% can't be met by remove on mobilenet_v2: the best measured was 0.0%"):
        plan_for_latency(model, scores, "remove", 0.3, lambda pruned: 1.0, max_steps=3)
    with pytest.raises(UserError, match="zero mode keeps every FLOP"):
        plan_for_latency(model, scores, "zero", 0.3, lambda pruned: 1.0)
    assert parse_latency_budget("latency=-30%") == 0.3 and parse_latency_budget("flops=-30%") is None
    with pytest.raises(UserError, match="use latency=-30%"):
        parse_latency_budget("latency=fast")


def test_cli_prunes_to_a_measured_latency_budget(workdir):
    """The CLI wiring, whichever way this machine's timing falls: a met budget writes the model and a
    plan that is one of the measured steps; a missed one exits 2 with the closest step named. Both
    write the search record. (Whether -5% is reachable depends on the CPU, so neither is asserted.)"""
    tmp, _ = workdir
    if not (tmp / "model").exists():
        xprune("convert", f"--arch={ARCH}", f"--weights={tmp / 'w.pth'}", f"--out={tmp / 'model'}")
    xprune("score", f"--model={tmp / 'model'}", "--criterion=l1", f"--out={tmp / 'l1_latency.json'}")
    result = xprune("prune", f"--model={tmp / 'model'}", f"--scores={tmp / 'l1_latency.json'}", "--mode=shrink",
                    "--budget=latency=-5%", "--batch_size=4", "--repeats=5", "--warmup=1", f"--out={tmp / 'fast'}",
                    check=False)
    search = json.loads((tmp / "fast.latency.json").read_text())
    measured = [s for s in search["steps"] if "latency_ratio" in s]
    assert search["budget"] == "latency=-5%" and measured and "latency search step 1" in result.stdout
    assert all(s["met"] == (s["latency_ratio"] <= 0.95) for s in measured)
    if search["met"]:
        assert result.returncode == 0, result.stderr[-2000:]
        plan = json.loads((tmp / "fast.plan.json").read_text())
        cut = 1 - plan["flops_after"] / plan["flops_before"]
        assert plan["budget"] == "latency=-5%" and (tmp / "fast").is_dir()
        assert cut == min(s["flops_cut"] for s in measured if s["met"])
    else:
        closest = min(measured, key=lambda s: s["latency_ratio"])
        assert result.returncode == 2 and not (tmp / "fast").exists() and not any(s["met"] for s in measured)
        assert f"the best measured was {1 - closest['latency_ratio']:.1%} faster" in result.stderr
