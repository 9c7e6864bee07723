"""The command line end to end, as a user runs it: `xprune convert` then `xprune predict` (a real process), score,
prune, export, bench."""

import contextlib
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from tests.conftest import REPO
from xprune_jax import cli

ARCH = "shufflenet_v2_x0_5"


def xprune(*args, check=True, real_process=False) -> subprocess.CompletedProcess:
    """``xprune args``: its exit status, stdout and stderr. Run in this process (:func:`cli.invoke`: no
    Python start and imports per command, and compiled programs stay in memory) unless ``real_process``
    (the console script itself, as a user runs it)."""
    argv = [*map(str, args), f"--cache_dir={REPO / '.cache' / 'jax'}"]
    if real_process:
        env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
        result = subprocess.run([sys.executable, "-m", "xprune_jax", *argv], capture_output=True, text=True, env=env,
                                cwd=REPO)
    else:
        stdout, stderr, cwd = io.StringIO(), io.StringIO(), os.getcwd()
        os.chdir(REPO)  # configs/... as the console script's cwd=REPO reads them (contextlib.chdir is 3.11+)
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                code = cli.invoke(["xprune", *argv])
        finally:
            os.chdir(cwd)
        result = subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, coco_images):
    tmp = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = torchvision.models.get_model(ARCH, weights=None).eval()
    torch.save(model.state_dict(), tmp / "w.pth")
    (tmp / "images").mkdir()
    for path in coco_images[:3]:
        shutil.copy(path, tmp / "images")
    return tmp, model


def test_convert_then_predict_matches_torch(workdir):
    tmp, torch_model = workdir
    converted = xprune("convert", f"--arch={ARCH}", f"--weights={tmp / 'w.pth'}", f"--out={tmp / 'model'}")
    note = converted.stdout.strip().splitlines()[-1]  # no model card, no official file name: the assumption is said
    assert note.startswith(f"note: {tmp / 'w.pth'} has no model card")
    assert "ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1 was assumed (resize 256, crop 224)" in note
    xprune("predict", f"--model={tmp / 'model'}", f"--images={tmp / 'images'}", f"--out={tmp / 'logits.npz'}",
           "--batch_size=2", real_process=True)  # 3 images: the last batch is padded
    result = np.load(tmp / "logits.npz")
    files = sorted(os.listdir(tmp / "images"))
    assert list(result["files"]) == files
    transform = torchvision.models.ShuffleNet_V2_X0_5_Weights.DEFAULT.transforms()
    batch = torch.stack([transform(Image.open(tmp / "images" / f).convert("RGB")) for f in files])
    with torch.no_grad():
        want = torch_model(batch).numpy()
    np.testing.assert_allclose(result["logits"], want, atol=2e-4 * np.abs(want).max())


@pytest.mark.parametrize("args, message", [
    (("convert", f"--arch={ARCH}", "--out=/tmp/x"), "missing --weights"),
    (("convert", "--arch=nope", "--weights=w.pth", "--out=/tmp/x"), "unknown architecture 'nope'"),
    (("predict", "--model=/nonexistent", "--images=/tmp", "--out=/tmp/x.npz"), "is not a model directory"),
])
def test_errors_are_one_line_with_exit_status_2(args, message):
    result = xprune(*args, check=False)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_unknown_command_lists_the_commands():
    result = xprune("frobnicate", check=False)
    assert result.returncode == 2 and "unknown command 'frobnicate'; choose one of convert, predict" in result.stderr


def test_score_writes_layers_and_comparison(workdir, coco_root):
    import json

    tmp, _ = workdir
    if not (tmp / "model").exists():
        xprune("convert", f"--arch={ARCH}", f"--weights={tmp / 'w.pth'}", f"--out={tmp / 'model'}")
    out = tmp / "scores.json"
    result = xprune("score", f"--model={tmp / 'model'}", "--criterion=grad_x_act,l1,random", f"--coco={coco_root}",
                    "--calib_split=val2017", "--calib_images=3", "--batch_size=2", "--seed=5", f"--out={out}")
    scores = json.loads(out.read_text())
    assert scores["criterion"] == "grad_x_act" and scores["objective"] == "cross_entropy"
    assert len(scores["calibration"]["images"]) == 3 and scores["calibration"]["seed"] == 5
    layer = next(l for l in scores["layers"] if l["name"] == "stage2.1.branch2.0")
    assert layer["kind"] == "pointwise" and layer["shape"] == [28, 28, 24] and layer["params"] == 24 * 24
    assert layer["flops"] == 28 * 28 * 24 * 24 and len(layer["channel_scores"]) == 24
    assert layer["score"] == layer["scores"]["grad_x_act"] > 0
    assert {(r["a"], r["b"]) for r in scores["comparison"]} == {("grad_x_act", "l1"), ("grad_x_act", "random"), ("l1", "random")}
    assert "grad_x_act vs l1: Spearman" in result.stdout


@pytest.mark.parametrize("args, message", [
    (("--criterion=shap",), "unknown criterion 'shap'"),
    (("--criterion=grad_x_act:median",), "has no variant 'median'"),
    (("--coco=/nonexistent",), "COCO root /nonexistent does not exist"),
    (("--calib_split=train2017",), "has no train2017/ to calibrate on: set --calib_split"),
    (("--calib_images=100000",), "calibration images asked for, but only"),
])
def test_score_errors(workdir, coco_root, args, message):
    tmp, _ = workdir
    if not (tmp / "model").exists():
        xprune("convert", f"--arch={ARCH}", f"--weights={tmp / 'w.pth'}", f"--out={tmp / 'model'}")
    result = xprune("score", f"--model={tmp / 'model'}", f"--coco={coco_root}", "--calib_split=val2017",
                    f"--out={tmp / 'x.json'}", *args, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_prune_remove_then_export(workdir, coco_root):
    import json

    tmp, _ = workdir
    if not (tmp / "model").exists():
        xprune("convert", f"--arch={ARCH}", f"--weights={tmp / 'w.pth'}", f"--out={tmp / 'model'}")
    xprune("score", f"--model={tmp / 'model'}", "--criterion=l1", f"--out={tmp / 'l1.json'}")
    result = xprune("prune", f"--model={tmp / 'model'}", f"--scores={tmp / 'l1.json'}", "--mode=remove",
                    "--budget=flops=-10%", f"--out={tmp / 'pruned'}", f"--export_torch={tmp / 'pruned.pt'}")
    plan = json.loads((tmp / "pruned.plan.json").read_text())
    assert plan["mode"] == "remove" and plan["flops_after"] <= 0.9 * plan["flops_before"]
    assert "FLOPs" in result.stdout and json.loads((tmp / "pruned" / "model.json").read_text())["plans"][0] == plan
    assert json.loads((tmp / "pruned" / "model.json").read_text())["pruned_from"]["model"] == str(tmp / "model")
    exported = torch.load(tmp / "pruned.pt", weights_only=True)
    removed = plan["selected"][0]  # a unit's branch, made the identity: stageK.I.branch2
    assert exported["arch"] == ARCH and removed.endswith(".branch2")
    assert not any(k.startswith(removed + ".") for k in exported["state_dict"])
    assert dict(exported["spec"]["edits"]["removed"])[removed] == "identity"
    # The pruned model predicts (end to end through the CLI).
    xprune("predict", f"--model={tmp / 'pruned'}", f"--images={tmp / 'images'}", f"--out={tmp / 'p.npz'}")
    bench = xprune("bench", f"--model={tmp / 'model'}", f"--model={tmp / 'pruned'}", "--repeats=3", "--warmup=1",
                   "--batch_size=2", f"--out={tmp / 'bench.json'}")
    summary = json.loads((tmp / "bench.json").read_text())["summary"]
    assert summary["model"]["ratio_median"] == 1.0 and summary["pruned"]["n"] == 3
    assert summary["pruned"]["median_ms"] > 0 and "| pruned |" in bench.stdout
    bad = xprune("prune", f"--model={tmp / 'model'}", f"--scores={tmp / 'l1.json'}", "--mode=zero",
                 "--budget=flops=-10%", f"--out={tmp / 'z'}", check=False)
    assert bad.returncode == 2 and "zero mode keeps every FLOP" in bad.stderr
