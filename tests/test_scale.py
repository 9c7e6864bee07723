"""Scale-out: score, eval, predict and finetune give one device's numbers on 4 devices of one process and on
2 processes of 2 devices each (a coordinator on 127.0.0.1), a killed process stops the other with one line
(bounded by --distributed_timeout), the killed evaluation resumes per process to the same detections, and
bad multi-process input is one line.

Tiny models with random weights (a narrow 4-block ResNet at 64 px, YOLOv8n at 64 px) on 8 real COCO images,
evaluated against labels made from the detector's own boxes (so AP is neither 0 nor 1). The one-device
reference runs in this process; the others are subprocesses (tests/scale_worker.py) with forced host devices.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.conftest import REPO
from tests.pseudo_ground_truth import pseudo_ground_truth
from tests.scale_worker import commands
from tests.test_cli_robustness import CLASSES, classifier, one_line_error, random_model, xprune
from xprune_jax import cli
from xprune_jax.checkpoint import Model, load_model, save_model
from xprune_jax.evaluation.coco import detect
from xprune_jax.models.resnet import ResidualBlockSpec, ResNetSpec
from xprune_jax.models.yolov8 import yolov8_spec

IMAGES = 8
WORKER = REPO / "tests" / "scale_worker.py"
SCORE_RTOL = 1e-5  # of a layer's largest score: float32 sums in another order (per device, then across them)
# of each leaf's largest value: train-mode BatchNorm over few values (8 images on 2x2 maps) turns float32 noise in the
# order of sums into ~1e-5 (running variances, the last layers' weights); the parameters move by ~1e-3
PARAMS_RTOL = 1e-4
NOISE = 1e-7  # leaves that are 0 in exact arithmetic (a conv bias before BatchNorm gets no gradient) hold noise ~1e-8


def tiny_classifier() -> Model:
    """A ResNet of four narrow basic blocks at 64 px, for the shapes' 6 classes: cheap to compile."""
    blocks = tuple(ResidualBlockSpec(f"layer{i + 1}.0", (w,), w, 1 if i == 0 else 2, i > 0)
                   for i, w in enumerate((8, 16, 16, 32)))
    preprocess = {"resize": 72, "crop": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    return random_model("resnet18", ResNetSpec("basic", 8, blocks, len(CLASSES), 1e-5),
                        {"preprocess": preprocess, "categories": CLASSES}, 0)


@pytest.fixture(scope="module")
def work(tmp_path_factory, coco_root):
    """Models, a COCO root of 8 real images labelled by the detector's own jittered boxes, and the one-device
    reference of every run (this process)."""
    tmp = tmp_path_factory.mktemp("scale")
    save_model(tiny_classifier(), str(tmp / "cls"))
    detector = random_model("yolov8n", yolov8_spec("n", 80), {"preprocess": {"imgsz": 64}, "categories": []}, 0)
    save_model(detector, str(tmp / "det"))
    annotations = coco_root / "annotations" / "instances_val2017.json"
    with open(annotations) as f:
        dataset = json.load(f)
    images = sorted((e for e in dataset["images"] if (coco_root / "val2017" / e["file_name"]).exists()),
                    key=lambda e: e["file_name"])[:IMAGES]
    (tmp / "coco" / "val2017").mkdir(parents=True)
    for e in images:
        os.symlink(coco_root / "val2017" / e["file_name"], tmp / "coco" / "val2017" / e["file_name"])
    ids = [e["id"] for e in images]
    found, _ = detect(detector, [str(tmp / "coco" / "val2017" / e["file_name"]) for e in images], ids,
                      [(e["height"], e["width"]) for e in images], 4, progress=False)
    labels = pseudo_ground_truth(annotations, found, ids).dataset
    (tmp / "coco" / "annotations").mkdir()
    with open(tmp / "coco" / "annotations" / "instances_val2017.json", "w") as f:
        json.dump({**labels, "images": images}, f)
    for name, run in commands(tmp, tmp / "one").items():
        if name != "bad_batch":
            assert cli.invoke(["xprune", *run, f"--cache_dir={REPO / '.cache' / 'jax'}"]) == 0, name
    with open(tmp / "one" / "eval" / "metrics.json") as f:
        ap = json.load(f)["AP"]
    assert 0.05 < ap < 0.95, ap  # labels the detector partly finds: AP moves when a box moves
    return tmp


def _env(devices: int) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"}


def _worker(work, out, names: str, devices: int, *flags) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), str(work), str(out), names, *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env(devices))


def _results(process: subprocess.Popen, timeout: float = 300) -> dict:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same_as_one_device(work, out) -> None:
    """Scores, logits and fine-tuned parameters to float tolerance; detections and AP exactly."""
    one = work / "one"
    with open(one / "scores.json") as f, open(out / "scores.json") as g:
        ref, got = json.load(f), json.load(g)
    assert [la["name"] for la in ref["layers"]] == [la["name"] for la in got["layers"]]
    assert ref["calibration"]["images"] == got["calibration"]["images"]  # the same global draw
    for la, lb in zip(ref["layers"], got["layers"]):
        for criterion, value in la["scores"].items():
            if value is not None:
                np.testing.assert_allclose(lb["scores"][criterion], value, rtol=SCORE_RTOL, err_msg=la["name"])
        if la["channel_scores"]:
            scale = max(abs(v) for v in la["channel_scores"])
            np.testing.assert_allclose(lb["channel_scores"], la["channel_scores"], rtol=SCORE_RTOL, atol=SCORE_RTOL * scale)
    with open(one / "eval" / "detections.json") as f, open(out / "eval" / "detections.json") as g:
        assert json.load(f) == json.load(g)
    ref, got = np.load(one / "predict.npz"), np.load(out / "predict.npz")
    assert list(ref["files"]) == list(got["files"])
    np.testing.assert_allclose(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5 * np.abs(ref["logits"]).max())
    with open(one / "eval" / "metrics.json") as f, open(out / "eval" / "metrics.json") as g:
        ref, got = json.load(f), json.load(g)
    assert {k: ref[k] for k in ("AP", "AP50", "AR100", "made_by")} == {k: got[k] for k in ("AP", "AP50", "AR100", "made_by")}
    start = load_model(str(work / "cls")).variables
    ref, got = load_model(str(one / "finetune")).variables, load_model(str(out / "finetune")).variables
    leaves = jax.tree_util.tree_leaves
    moved = max(float(np.abs(a - b).max()) for a, b in zip(leaves(ref["params"]), leaves(start["params"])))
    assert moved > 1e-4  # the steps changed the parameters
    for a, b in zip(leaves(got), leaves(ref)):
        assert np.abs(a - b).max() <= PARAMS_RTOL * np.abs(b).max() + NOISE, (np.abs(a - b).max(), np.abs(b).max())


def test_four_devices_equal_one(work):
    """One process with 4 host devices: the same scores, detections, AP, predictions and fine-tuned
    parameters as one device; a batch that does not split over the 4 devices is one line."""
    out = work / "four"
    results = _results(_worker(work, out, "score,eval,predict,finetune,bad_batch", 4))
    for name in ("score", "eval", "predict", "finetune"):
        assert results[name]["code"] == 0, results[name]["stderr"][-2000:]
    one_line_error(results["bad_batch"]["code"], results["bad_batch"]["stderr"], "--batch_size=6",
                   "does not split over the 4 devices", "multiple of 4")
    with open(out / "finetune" / "model.json") as f:
        assert json.load(f)["finetune"][-1]["devices"] == 4
    _same_as_one_device(work, out)



ALL_REDUCES = """
import re, jax, numpy as np
from tests.test_scale import tiny_classifier
from xprune_jax import parallel
from xprune_jax.attribution.objectives import get_objective
from xprune_jax.attribution.statistics import statistics_step
model, mesh = tiny_classifier(), parallel.data_mesh()
objective = get_objective("cross_entropy", "classification", model.arch, model.spec)[1]
batch = parallel.global_batch({"images": np.zeros((4, 64, 64, 3), np.float32), "labels": np.zeros(4, np.int32),
                               "weights": np.ones(4, np.float32)}, 4, mesh)
hlo = statistics_step(model.module, objective, False, mesh).lower(model.variables, batch).compile().as_text()
operands = re.findall(r" all-reduce(?:-start)?\\(([^)]*)\\)", hlo)  # a combined all-reduce takes many buffers
print(mesh.size, len(operands), sum(len(o.split(",")) for o in operands))
"""


def test_scoring_step_all_reduces_its_statistics_as_one_buffer():
    """On 4 devices the step all-reduces its statistics as one buffer, not one per statistic (4 per layer):
    XLA combines the sums into one all-reduce op either way, but between processes each of its buffers
    cost a gloo round trip on CPU (292 buffers made a 2-process `score` 7x slower than one device)."""
    done = subprocess.run([sys.executable, "-c", ALL_REDUCES], capture_output=True, text=True, cwd=REPO, env=_env(4),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["4", "1", "1"]


def test_two_processes_equal_one_and_survive_a_crash(work):
    """Two processes of 2 devices each (coordinator on 127.0.0.1). First process 1 is killed half way through
    the evaluation: process 0 stops with one line naming it, within the timeout. Then both run again: the
    evaluation resumes from each process's own partial file, and every result equals one device's."""
    out, port = work / "two", _free_port()

    def flags(index: int) -> list[str]:
        return [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={index}",
                "--distributed_timeout=5"]

    leader, follower = (_worker(work, out, "eval", 2, *flags(i)) for i in (0, 1))
    partial = out / "eval" / "detections.partial.process1of2.jsonl"
    deadline = time.monotonic() + 240
    while not (partial.exists() and partial.read_text().count("\n") >= 2):  # its first batch is logged
        assert follower.poll() is None and leader.poll() is None, (follower.poll(), leader.poll())
        assert time.monotonic() < deadline, "process 1 logged no batch"
        time.sleep(0.01)
    follower.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = leader.communicate(timeout=60)
    follower.communicate()
    assert time.monotonic() - killed < 5 + 15  # the timeout, a poll, and process 0's last batches
    one_line_error(leader.returncode, "\n".join(line for line in stderr.splitlines() if line.startswith("xprune")),
                   "xprune eval: error: process 1 has not answered for 5 s")
    assert not (out / "eval" / "detections.json").exists()
    logged = [json.loads(line) for line in partial.read_text().splitlines()[1:] if line.endswith("}")]
    assert 0 < len(logged) < IMAGES // 2  # process 1 had done part of its share

    port = _free_port()
    leader, follower = (_worker(work, out, "eval,score,predict,finetune", 2, *flags(i)) for i in (0, 1))
    follower_out, follower_err = follower.communicate(timeout=300)
    leader_out, leader_err = leader.communicate(timeout=60)
    assert (leader.returncode, follower.returncode) == (0, 0), (leader_err[-3000:], follower_err[-3000:])
    results = json.loads(leader_out.strip().splitlines()[-1])
    for name, result in results.items():
        assert result["code"] == 0, (name, result["stderr"][-2000:])
    assert not partial.exists()
    log = (out / "eval").with_name("eval.process1.log")  # process 1's output; process 0 wrote the results
    assert log.exists() and not list(out.glob("**/*.partial*"))
    assert "wrote" not in follower_out.split("{")[0]
    with open(out / "finetune" / "model.json") as f:
        assert json.load(f)["finetune"][-1]["processes"] == 2
    _same_as_one_device(work, out)


def test_unreachable_coordinator_is_one_line_within_the_timeout(work):
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "xprune_jax", *commands(work, work / "nowhere")["score"],
                             f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2", "--process_id=1",
                             "--distributed_timeout=2", f"--cache_dir={REPO / '.cache' / 'jax'}"],
                            capture_output=True, text=True, cwd=REPO, env=_env(1), timeout=120)
    assert time.monotonic() - start < 2 + 30  # imports, then the bounded wait
    one_line_error(result.returncode, result.stderr, "xprune score: error: cannot reach the coordinator at 127.0.0.1:",
                   "within 2 s")
    assert not (work / "nowhere").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--num_processes=2", "--process_id=2"], ["--process_id=2 is invalid", "0..1"]),
    (["--num_processes=2", "--process_id=-1"], ["--process_id=-1 is invalid"]),
    (["--num_processes=0"], ["--num_processes=0 is invalid"]),
    (["--coordinator_address=localhost", "--num_processes=2", "--process_id=0"], ["give HOST:PORT"]),
    (["--num_processes=2", "--process_id=0", "--distributed_timeout=0"], ["--distributed_timeout=0 is invalid"]),
])
def test_bad_multi_process_flags_are_one_line(tmp_path, capfd, flags, expected):
    code, _, err = xprune(capfd, *commands(tmp_path, tmp_path / "out")["score"], *flags)
    one_line_error(code, err, *expected)
    assert not (tmp_path / "out").exists()


def test_commands_that_do_not_scale_refuse_multi_process_flags(tmp_path, capfd):
    save_model(classifier(0), str(tmp_path / "cls"))
    code, _, err = xprune(capfd, "bench", f"--model={tmp_path / 'cls'}", "--num_processes=2", "--process_id=0",
                          "--coordinator_address=127.0.0.1:1")
    one_line_error(code, err, "xprune bench runs in one process", "--num_processes")


def test_predict_keeps_images_without_an_id_apart(work, tmp_path):
    """Detections of images whose names carry no COCO id (image_id None) stay with their own file (they
    used to be collected under one key: every file got the last image's detections)."""
    from xprune_jax.evaluation.coco import predict_folder

    for name, source in zip(("a.jpg", "b.jpg"), sorted((work / "coco" / "val2017").iterdir())):
        shutil.copy(source, tmp_path / name)
    entries = predict_folder(load_model(str(work / "det")), str(tmp_path), 2, progress=False)
    by_file = {name: [e["bbox"] for e in entries if e["file_name"] == name] for name in ("a.jpg", "b.jpg")}
    assert by_file["a.jpg"] and by_file["b.jpg"] and by_file["a.jpg"] != by_file["b.jpg"]
    assert all(e["image_id"] is None for e in entries)
