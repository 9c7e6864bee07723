"""The measured-latency budget: the search finds the smallest FLOPs cut that meets the target under a
known latency model, refuses what can't be met, and runs end to end through `xprune prune`."""

import json

import pytest

from tests.test_cli import ARCH, workdir, xprune  # noqa: F401 (workdir: a pytest fixture)
from xprune_jax import analysis, models
from xprune_jax.attribution.score import score_model
from xprune_jax.checkpoint import Model, load_model
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


def test_latency_price_takes_the_costlier_channels_first(model_and_scores):
    """A table whose time follows FLOPs changes nothing, nor does exponent 0: the default plan. A table
    in which one group's producers are slow for their FLOPs: priced, the allocation cuts that group to
    its floor first; unpriced, it keeps more. Bad uses are refused."""
    from xprune_jax.pruning.plan import make_plan
    from xprune_jax.pruning.surgery import graph_of

    model, scores = model_and_scores
    default = make_plan(model, scores, "shrink", "flops=-20%")
    assert make_plan(model, scores, "shrink", "flops=-20%", latency_price=0.0).keep_channels == default.keep_channels
    groups = {g.name: g for g in graph_of(model.arch, model.spec).groups}
    floor = {n: max(8, -(-groups[n].width // 64) * 8) for n in groups}  # floor 1/8 of the width, a multiple of 8
    name = max((n for n in groups if len(default.keep_channels.get(n, range(groups[n].width))) > floor[n] + 8),
               key=lambda n: groups[n].width)
    convs = [l for l in analysis.describe_layers(model.arch, model.spec, 224) if l.kind != "block"]
    following = {"layers": {l.name: {"seconds": 1e-9 * l.flops} for l in convs}}  # time that follows FLOPs
    assert make_plan(model, scores, "shrink", "flops=-20%", latency_price=1.0,
                     layer_latency=following).keep_channels == default.keep_channels
    table = json.loads(json.dumps(following))  # the group's producers 100x slower for their FLOPs
    for slot in groups[name].producers:
        table["layers"][slot.layer]["seconds"] *= 100
    priced = make_plan(model, scores, "shrink", "flops=-20%", latency_price=1.0, layer_latency=table)
    assert len(priced.keep_channels[name]) == floor[name] < len(default.keep_channels.get(name, range(groups[name].width)))
    assert priced.latency_price == 1.0 and default.latency_price == 0.0
    assert priced.flops_after <= 0.8 * priced.flops_before
    with pytest.raises(UserError, match="latency_price=-1.0 is invalid"):
        make_plan(model, scores, "shrink", "flops=-20%", latency_price=-1.0, layer_latency=table)
    with pytest.raises(UserError, match="prices channels in the global allocation"):
        make_plan(model, scores, "remove", "flops=-20%", latency_price=1.0, layer_latency=table)
    with pytest.raises(UserError, match="needs the layer latency table"):
        make_plan(model, scores, "shrink", "flops=-20%", latency_price=1.0)
    with pytest.raises(UserError, match="has no layer"):
        make_plan(model, scores, "shrink", "flops=-20%", latency_price=1.0, layer_latency={"layers": {"conv": {}}})


def test_cli_prices_channels_by_measured_layer_latency(workdir, capfd):
    """`xprune prune --latency_price` measures every conv and linear layer's latency, writes the
    table beside the model and records the price in the plan; the same table reused gives the same plan;
    a table measured for something else, or one given without the price, gets a one-line error."""
    tmp, _ = workdir
    if not (tmp / "model").exists():
        xprune("convert", f"--arch={ARCH}", f"--weights={tmp / 'w.pth'}", f"--out={tmp / 'model'}")
    if not (tmp / "l1_latency.json").exists():
        xprune("score", f"--model={tmp / 'model'}", "--criterion=l1", f"--out={tmp / 'l1_latency.json'}")
    common = (f"--model={tmp / 'model'}", f"--scores={tmp / 'l1_latency.json'}", "--mode=shrink", "--budget=flops=-30%",
              "--batch_size=1")
    result = xprune("prune", *common, "--latency_price=0.5", "--repeats=2", f"--out={tmp / 'priced'}")
    assert "measuring each layer's latency" in result.stdout
    table = json.loads((tmp / "priced.layer_latency.json").read_text())
    convs = [l.name for l in analysis.describe_layers(ARCH, load_model(str(tmp / "model")).spec, 224) if l.kind != "block"]
    assert sorted(table["layers"]) == sorted(convs) and table["arch"] == ARCH and table["batch_size"] == 1
    assert all(v["seconds"] > 0 and 1 <= min(v["loops"]) <= max(v["loops"]) <= table["inner"] for v in table["layers"].values())
    plan = json.loads((tmp / "priced.plan.json").read_text())
    assert plan["latency_price"] == 0.5
    xprune("prune", *common, "--latency_price=0.5", f"--layer_latency={tmp / 'priced.layer_latency.json'}",
           f"--out={tmp / 'again'}")
    assert json.loads((tmp / "again.plan.json").read_text())["keep_channels"] == plan["keep_channels"]
    (tmp / "other.json").write_text(json.dumps({**table, "batch_size": 4}))
    for flags, message in (((f"--layer_latency={tmp / 'other.json'}",), "is the table --latency_price reads"),
                           (("--latency_price=0.5", f"--layer_latency={tmp / 'other.json'}"), "was measured for batch_size 4, not 1"),
                           (("--latency_price=-1",), "--latency_price=-1.0 is invalid")):
        result = xprune("prune", *common, *flags, f"--out={tmp / 'bad'}", check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert message in lines[0], lines


def test_layer_latency_times_every_layer_of_a_detector():
    """The layers a latency table times are every conv and linear layer the analysis counts, an R-CNN
    head's shared convs included, once per FPN level (RetinaNet: P3-P7)."""
    from xprune_jax.pruning.latency import layer_calls

    arch = "retinanet_resnet50_fpn"
    spec = models.get_architecture(arch).default_spec()
    model = Model(arch, spec, models.variable_shapes(arch, spec), {"preprocess": {"imgsz": 64}})
    calls = layer_calls(model)
    assert sorted(calls) == sorted(l.name for l in analysis.describe_layers(arch, spec, 64) if l.kind != "block")
    assert [shape[:2] for shape in calls["head.classification_head.conv.0.0"][1]] == [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    assert len(calls["backbone.body.conv1"][1]) == 1


def test_layer_latency_loops_each_layer_as_often_as_its_speed_needs(monkeypatch):
    """A timed call loops a layer until it takes about ``call_seconds``, at most ``inner`` times: once
    when any call is long enough, ``inner`` times when none is; the seconds are per run of the layer. Layers
    alike but for their names compile once."""
    from xprune_jax.pruning import latency

    spec = models.get_architecture("mobilenet_v2").default_spec()
    model = Model("mobilenet_v2", spec, models.init_variables("mobilenet_v2", spec, seed=0), {"preprocess": {"crop": 64}})
    every = latency.layer_calls(model)
    monkeypatch.setattr(latency, "layer_calls", lambda model, batch_size=1: dict(list(every.items())[:3]))
    once = latency.layer_latency(model, 1, repeats=3, inner=8, call_seconds=1e-9)
    looped = latency.layer_latency(model, 1, repeats=3, inner=8, call_seconds=10.0)
    assert sorted(once["layers"]) == sorted(looped["layers"]) == sorted(list(every)[:3])
    assert all(v["loops"] == [1] for v in once["layers"].values()) and once["call_seconds"] == 1e-9
    assert all(v["loops"] == [8] for v in looped["layers"].values())
    for name, v in looped["layers"].items():
        assert 0 < v["seconds"] < 10 * once["layers"][name]["seconds"]  # per run, not per looped call

    # layers alike but for their names (MobileNetV2's last two 160->960 expansions) share one compiled loop
    alike = {name: every[name] for name in ("features.15.conv.0.0", "features.16.conv.0.0")}
    monkeypatch.setattr(latency, "layer_calls", lambda model, batch_size=1: alike)
    compiled = latency._layer_loop._cache_size()
    shared = latency.layer_latency(model, 1, repeats=2, inner=1)
    assert sorted(shared["layers"]) == sorted(alike) and latency._layer_loop._cache_size() == compiled + 1
