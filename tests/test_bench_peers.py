"""What the peer benchmark (benchmarks/bench_peers.py) rests on, without Torch-Pruning installed: its
torch-side FLOPs count equals ours, YOLOv8's split-free C2f is exact, a torch model pruned apart from
our spec's ties comes back as our model with the same outputs, and the README's table is the one the
committed results make."""

import copy
import dataclasses
import json
import sys

import jax
import numpy as np
import pytest
import torch
import torchvision

from tests.conftest import REPO
from xprune_jax import analysis, models
from xprune_jax.checkpoint import Model
from xprune_jax.errors import UserError
from xprune_jax.experiments.prune import recovery_settings

sys.path.insert(0, str(REPO / "benchmarks"))
try:
    import bench_peers
finally:
    sys.path.remove(str(REPO / "benchmarks"))


@pytest.mark.parametrize("arch", ["mobilenet_v2", "shufflenet_v2_x1_0", "resnet50"])
def test_torch_flops_count_equals_the_analysis(arch):
    """Forward hooks on every Conv2d and Linear count what xprune_jax.analysis counts (at 224 px, the
    size the other FLOPs tests trace), and the widths read off the torch modules give our spec."""
    module = torchvision.models.get_model(arch, weights=None).eval()
    spec = models.get_architecture(arch).default_spec()
    assert bench_peers.torch_macs(module, torch.zeros(1, 3, 224, 224)) == \
        analysis.total_flops(analysis.describe_layers(arch, spec))
    if arch != "shufflenet_v2_x1_0":  # the benchmark reads widths back only where the peer can prune
        read = bench_peers.spec_from_torch(spec, module)
        assert read.edits.widths and dataclasses.replace(read, edits=spec.edits) == spec
        assert models.variable_shapes(arch, read) == models.variable_shapes(arch, spec)


def _narrowed(conv, keep_out=None, keep_in=None):
    """An Ultralytics ``Conv`` (conv + BN) or a plain Conv2d keeping some output and input channels."""
    plain = isinstance(conv, torch.nn.Conv2d)
    inner = conv if plain else conv.conv
    weight = inner.weight.data
    weight = weight if keep_out is None else weight[keep_out]
    weight = weight if keep_in is None else weight[:, keep_in]
    new = torch.nn.Conv2d(weight.shape[1], weight.shape[0], inner.kernel_size, inner.stride, inner.padding,
                          bias=inner.bias is not None)
    new.weight.data = weight.clone()
    if plain:
        return new
    conv.conv = new
    if keep_out is not None:
        bn = torch.nn.BatchNorm2d(len(keep_out), eps=conv.bn.eps)
        for key in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, key).data = getattr(conv.bn, key).data[keep_out].clone()
        conv.bn = bn
    return conv


def test_yolov8_split_free_c2f_and_a_chain_pruned_apart_come_back_exactly():
    """The split-free C2f gives the same outputs. A neck C2f whose bottleneck output is narrower than its
    chain (model.12) and one whose chain is narrower than its bottleneck output (model.15), as the peer
    prunes them, come back as our spec with exactly-zero padding: the JAX model equals the torch one."""
    from converters.reference import randomize_batch_norm
    from ultralytics.nn.tasks import DetectionModel

    from xprune_jax.models.yolov8 import yolov8_spec

    x = torch.rand(2, 3, 64, 96)
    module = randomize_batch_norm(DetectionModel("yolov8n.yaml", nc=6, verbose=False), x, seed=3).eval()
    with torch.no_grad():
        want = module(x)[0]
        split_free = bench_peers.split_free_c2f(copy.deepcopy(module))
        assert torch.equal(split_free(x)[0], want)

    c12, c15 = split_free.model[12], split_free.model[15]  # yolov8n: chains of 64 and 32 channels
    keep = torch.arange(48)  # model.12: m.0 outputs 48 of 64
    c12.m[0].cv2 = _narrowed(c12.m[0].cv2, keep_out=keep)
    c12.cv2.conv = _narrowed(c12.cv2.conv, keep_in=torch.cat([torch.arange(128), 128 + keep]))
    keep = torch.arange(0, 32, 2)  # model.15: cv1's half for the chain keeps 16 of 32
    c15.cv1 = _narrowed(c15.cv1, keep_out=keep)
    c15.m[0].cv1 = _narrowed(c15.m[0].cv1, keep_in=keep)
    c15.cv2.conv = _narrowed(c15.cv2.conv, keep_in=torch.cat([torch.arange(32), 32 + keep, torch.arange(64, 96)]))
    with torch.no_grad():
        want = split_free.eval()(x)[0].numpy()

    base = Model("yolov8n", yolov8_spec("n", 6), {}, {})
    model, padded = bench_peers.model_from_torch(base, split_free, "test")
    channels = dict(model.spec.edits.channels)
    assert padded == 16 + 16 and (len(channels["model.12.second"]), len(channels["model.15.second"])) == (64, 32)
    assert dataclasses.replace(model.spec, edits=base.spec.edits) == base.spec  # the edits say what changed
    got = np.asarray(jax.jit(model.module.apply)(model.variables, x.permute(0, 2, 3, 1).numpy()))
    np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max())


def test_readme_holds_the_table_the_results_make():
    results = bench_peers.load_results()
    table = "\n".join(bench_peers.readme_table(results))
    assert len(results) >= 3 and table.count("\n") >= 2 * len(results)
    assert table in (REPO / "README.md").read_text(), \
        "README's Torch-Pruning table is stale: paste `python benchmarks/bench_peers.py table`'s 'Who wins'"
    recovered = "\n".join(bench_peers.recovery_table())
    assert recovered.count("\n") >= 3 and recovered in (REPO / "README.md").read_text(), \
        "README's table of both tools after recovery is stale: paste `python benchmarks/bench_peers.py table`'s 'After recovery'"
    for path in sorted((REPO / "benchmarks" / "results" / "peers").glob("*.recovery.json")):
        made = json.loads(path.read_text())
        assert made["recovery"] == recovery_settings(bench_peers.recovery_recipe(made["arch"]).to_dict()), \
            f"{path.name} was recovered with another recipe than configs/recovery.py's: run `recover` again"


def test_recovery_table_compares_both_fine_tuned_models_over_seeds(tmp_path):
    def write(ours, peer, unpruned=None):
        rows = [{"side": side, "cell": cell, "budget": 30.0, "seed": seed, "model": f"{side}{seed}" if side == "ours" else "tp",
                 "as_cut": 0.5, "recalibrated": 0.6, "finetuned": value}
                for seed, pair in enumerate(zip(ours, peer))
                for side, cell, value in zip(("ours", "torch-pruning"), ("grad_x_act shrink mean", "TP taylor global"), pair)]
        (tmp_path / "mobilenet_v2.recovery.json").write_text(json.dumps(
            {"label": "MobileNetV2", "metric": "top1", "unpruned": {"metrics": {"top1": 0.95}, **(unpruned or {})},
             "rows": rows}))
        return bench_peers.recovery_table(str(tmp_path))

    lines = write(ours=(0.90, 0.92, 0.91), peer=(0.80, 0.81, 0.82))
    assert lines[2:] == [
        "| MobileNetV2 (top-1 95.0%) | -30% | ours, grad_x_act shrink mean (3 seeds) | 50.0% | 60.0% | 91.0% ± 1.0% | 95.8% | **ours** |",
        "|  |  | TP, taylor global (1 model, 3 seeds) | 50.0% | 60.0% | 81.0% ± 1.0% | 85.3% |  |"]
    assert write(ours=(0.80, 0.84, 0.82), peer=(0.80, 0.81, 0.82))[2].endswith("| tie (within the seeds' spread) |")
    assert write(ours=(0.70, 0.71, 0.72), peer=(0.80, 0.81, 0.82))[2].endswith("| **Torch-Pruning** |")
    alike = {"recovery": {"finetuned": {"metrics": {"top1": 0.97}}}}  # the task loss trained the unpruned model too
    assert write(ours=(0.90, 0.92, 0.91), peer=(0.80, 0.81, 0.82), unpruned=alike)[2].startswith(
        "| MobileNetV2 (top-1 95.0%; fine-tuned alike 97.0%) | -30% |")
    (tmp_path / "mobilenet_v2.json").write_text(json.dumps({"weights_sha256": "b" * 64}))  # the run beside it: other weights
    with pytest.raises(UserError, match="made from other weights"):
        write(ours=(0.90, 0.92, 0.91), peer=(0.80, 0.81, 0.82))


def test_latency_duel_pairs_each_seeds_models_and_pools_the_ratios(monkeypatch):
    times = {"unpruned": [4.0, 4.0], "ours 0": [1.0, 3.0], "peer 0": [2.0, 2.0], "ours 1": [5.0, 5.0], "peer 1": [4.0, 5.0]}
    monkeypatch.setattr(bench_peers, "_timed_call", lambda fixture, model: model)
    monkeypatch.setattr("xprune_jax.timing.time_side_by_side", lambda calls, *_: {name: times[name] for name in calls})
    duel = bench_peers.latency_duel(None, "unpruned", {0: ("ours 0", "peer 0"), 1: ("ours 1", "peer 1")}, repeats=2)
    assert duel["seeds"]["0"]["ratio_median"] == 1.0 and duel["seeds"]["1"]["ratio_median"] == 1.125
    assert duel["ours"]["n"] == 4 and duel["ours"]["ratio_median"] == np.median([0.5, 1.5, 1.25, 1.0])
    assert (duel["seeds"]["1"]["ours_ms"], duel["seeds"]["1"]["peer_ms"], duel["unpruned_ms"]) == (5000.0, 4500.0, 4000.0)


def test_a_fixture_the_peer_cannot_prune_has_no_duel_one_line_and_status_2():
    import subprocess

    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_peers.py"), "duel", "--arch=shufflenet_v2_x1_0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: ") and "can't prune shufflenet_v2_x1_0" in done.stderr


def test_price_agreement_compares_two_tables_group_by_group():
    """Two equal tables, or one uniformly slower, agree fully; one layer slower in the second moves the
    prices of the groups it narrows, and only those."""
    spec = models.get_architecture("mobilenet_v2").default_spec()
    model = Model("mobilenet_v2", spec, models.init_variables("mobilenet_v2", spec, seed=0), {"preprocess": {"crop": 64}})
    convs = [l for l in analysis.describe_layers(model.arch, spec, 64) if l.kind != "block"]
    rng = np.random.default_rng(0)
    table = {"layers": {l.name: {"seconds": 1e-9 * l.flops * rng.uniform(0.5, 2.0)} for l in convs}}
    slower = {"layers": {n: {"seconds": 3 * v["seconds"]} for n, v in table["layers"].items()}}
    for again in (table, slower):
        agreement = bench_peers.price_agreement(model, table, again)
        assert agreement["groups"] > 10 and agreement["log_correlation"] == pytest.approx(1.0)
        assert agreement["max_ratio"] == pytest.approx(1.0)
    moved = json.loads(json.dumps(table))
    moved["layers"]["features.10.conv.0.0"]["seconds"] *= 4
    agreement = bench_peers.price_agreement(model, table, moved)
    assert 1.5 < agreement["max_ratio"] <= 4.0 + 1e-9 and agreement["log_correlation"] < 1.0
