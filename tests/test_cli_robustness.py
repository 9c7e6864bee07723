"""The command line under bad input and faults: results record what made them and reuse checks it,
inputs are validated before work, every failure is one line on stderr with exit status 2.

Most cases run in this process through ``cli.invoke`` with tiny random models (numpy weights, no
compile to make them); a few run as real subprocesses (kill and resume, two writers at once, help)
to show that the in-process harness tells the truth.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO
from xprune_jax import cli, models
from xprune_jax.checkpoint import Model, load_model, model_fingerprint, save_model
from xprune_jax.models.yolov8 import yolov8_spec
from xprune_jax.models.shufflenet_v2 import shufflenet_v2_spec

SHAPES = REPO / "xprune_jax" / "data" / "demo_shapes"
CLASSES = ["circle", "square", "triangle", "star", "cross", "ring"]
CACHE = f"--cache_dir={REPO / '.cache' / 'jax'}"


def random_model(arch: str, spec, meta: dict, seed: int) -> Model:
    """Random weights straight from the spec's shapes (no compile): enough to run every command."""
    rng = np.random.default_rng(seed)
    shapes = models.variable_shapes(arch, spec, 64)

    def fill(path, leaf):
        name = path[-1].key
        if name == "var":
            return np.ones(leaf.shape, np.float32)
        if name in ("mean", "bias"):
            return np.zeros(leaf.shape, np.float32)
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    import jax

    return Model(arch, spec, jax.tree_util.tree_map_with_path(fill, shapes), meta)


def classifier(seed: int = 0) -> Model:
    preprocess = {"resize": 40, "crop": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    return random_model("shufflenet_v2_x0_5", shufflenet_v2_spec("shufflenet_v2_x0_5", len(CLASSES)),
                        {"preprocess": preprocess, "categories": CLASSES}, seed)


def detector(seed: int = 0, names=CLASSES) -> Model:
    return random_model("yolov8n", yolov8_spec("n", len(names)), {"preprocess": {"imgsz": 128}, "categories": list(names)},
                        seed)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robust")
    save_model(classifier(0), str(tmp / "cls"))
    save_model(classifier(1), str(tmp / "cls_other"))
    save_model(detector(0), str(tmp / "det"))
    save_model(detector(1), str(tmp / "det_other"))
    (tmp / "images").mkdir()
    for name in sorted(os.listdir(SHAPES / "val2017"))[:2]:
        shutil.copy(SHAPES / "val2017" / name, tmp / "images")
    return tmp


def xprune(capfd, *args) -> tuple[int, str, str]:
    """``xprune args`` in this process: (exit status, stdout, stderr)."""
    code = cli.invoke(["xprune", *map(str, args), CACHE])
    out, err = capfd.readouterr()
    return code, out, err


def xprune_subprocess(*args, wait=True):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "xprune_jax", *map(str, args), CACHE]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)


def one_line_error(code: int, err: str, *expected: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# --- 1. eval resumes only from its own partial file -------------------------------------------------------

def _lines(path) -> int:
    try:
        with open(path) as f:
            return sum(1 for line in f if line.endswith("\n"))
    except FileNotFoundError:
        return 0


def test_eval_killed_then_another_model_is_refused_and_the_same_resumes(work, tmp_path, capfd):
    from xprune_jax.evaluation.coco import evaluate

    out = tmp_path / "eval"
    args = (f"--coco={SHAPES}", f"--out={out}", "--batch_size=1")
    process = xprune_subprocess("eval", f"--model={work / 'det'}", *args, wait=False)
    partial = out / "detections.partial.jsonl"
    while _lines(partial) < 3 and process.poll() is None:  # the header and two images
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = _lines(partial) - 1
    assert 2 <= done < 32, f"the eval was not stopped half way ({done} of 32 images done)"

    other = xprune_subprocess("eval", f"--model={work / 'det_other'}", *args)
    line = one_line_error(other.returncode, other.stderr, "detections.partial.jsonl holds detections made with another "
                          "model_fingerprint (", "--overwrite")
    assert "choose another --out" in line and _lines(partial) == done + 1

    code, stdout, err = xprune(capfd, "eval", f"--model={work / 'det'}", *args)  # the same model resumes
    assert code == 0, err
    latency = json.loads((out / "latency.json").read_text())
    assert latency["images_this_run"] <= 32 - done and not partial.exists()
    clean = evaluate(load_model(str(work / "det")), str(SHAPES), str(tmp_path / "clean"), batch_size=1, progress=False)
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed == clean and resumed["made_by"]["model_fingerprint"] == model_fingerprint(load_model(str(work / "det")))
    assert resumed["made_by"]["batch_size"] == 1 and resumed["made_by"]["images"] == 32
    assert json.loads((out / "detections.json").read_text()) == json.loads((tmp_path / "clean" / "detections.json").read_text())

    # other settings are refused too; --overwrite starts over
    partial.write_text(json.dumps({"made_by": {**resumed["made_by"], "batch_size": 4}}) + "\n")
    code, _, err = xprune(capfd, "eval", f"--model={work / 'det'}", *args)
    one_line_error(code, err, "another batch_size")
    code, _, err = xprune(capfd, "eval", f"--model={work / 'det'}", *args, "--max_images=2", "--overwrite")
    assert code == 0 and json.loads((out / "metrics.json").read_text())["images"] == 2, err


def test_a_second_eval_into_the_same_out_is_refused(work, tmp_path):
    out = tmp_path / "eval"
    args = (f"--model={work / 'det'}", f"--coco={SHAPES}", f"--out={out}", "--max_images=4")
    first = xprune_subprocess("eval", *args, wait=False)
    lock = out / ".xprune.lock"
    while not (lock.exists() and lock.read_text()) and first.poll() is None:
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # it holds the lock while the second one tries
    try:
        second = xprune_subprocess("eval", *args)
    finally:
        first.send_signal(signal.SIGCONT)
    one_line_error(second.returncode, second.stderr, f"is being written by xprune pid {first.pid}", "choose another --out")
    assert first.wait() == 0 and json.loads((out / "metrics.json").read_text())["images"] == 4


# --- 2. score calibrates on a training split, or a labelled image folder ----------------------------------

def test_score_calibration_split_and_image_folder_then_auto_prune_on_them(work, tmp_path, capfd, coco_root):
    code, _, err = xprune(capfd, "score", f"--model={work / 'cls'}", f"--coco={coco_root}", f"--out={tmp_path / 's.json'}")
    one_line_error(code, err, "has no train2017/", "--calib_split", "val2017 overlaps")

    code, _, err = xprune(capfd, "score", f"--model={work / 'cls'}", f"--coco={SHAPES}", "--calib_images=2",
                          "--criterion=grad_x_act,l1", f"--out={tmp_path / 's.json'}")
    assert code == 0, err
    scores = json.loads((tmp_path / "s.json").read_text())
    train = set(os.listdir(SHAPES / "train2017"))
    assert scores["calibration"]["split"] == "train2017" and set(scores["calibration"]["images"]) <= train
    assert scores["model_fingerprint"] == model_fingerprint(load_model(str(work / "cls")))

    code, _, err = xprune(capfd, "score", f"--model={work / 'cls'}", f"--image_folder={SHAPES / 'classification' / 'train'}",
                          "--calib_images=3", "--seed=1", f"--out={tmp_path / 'f.json'}")
    assert code == 0, err
    calibration = json.loads((tmp_path / "f.json").read_text())["calibration"]
    assert calibration["image_folder"] == str(SHAPES / "classification" / "train") and len(calibration["images"]) == 3
    assert calibration["ground_truth"] is True and calibration["split"] is None

    # prune's default (--mode=auto) finds those images again, and keeps the candidate of lowest loss on them
    folder, prune = f"--image_folder={SHAPES / 'classification' / 'train'}", ("prune", f"--model={work / 'cls'}",
                                                                              "--budget=flops=-30%")
    code, out, err = xprune(capfd, *prune, f"--scores={tmp_path / 'f.json'}", folder, "--batch_size=2",
                            "--candidates=shrink:mean,shrink:lamp", f"--out={tmp_path / 'auto'}")
    assert code == 0, err
    plan = json.loads((tmp_path / "auto.plan.json").read_text())
    tried = plan["selection"]["candidates"]
    assert [(t["mode"], t["normalize"]) for t in tried] == [("shrink", "mean"), ("shrink", "lamp")]
    assert plan["normalize"] == min(tried, key=lambda t: t["loss"])["normalize"] and "chosen by the calibration loss" in out
    from xprune_jax.attribution.score import selection_loss
    from xprune_jax.data.images import image_folder

    paths, labels, _ = image_folder(str(SHAPES / "classification" / "train"), CLASSES)
    index = [i for i, p in enumerate(paths) if os.path.basename(p) in calibration["images"]]
    loss = selection_loss(load_model(str(work / "cls")), "cross_entropy", ([paths[i] for i in index], labels[index]), 2)
    assert loss(load_model(str(tmp_path / "auto"))) == pytest.approx(min(t["loss"] for t in tried), rel=1e-6)
    for args, message in [
        ((f"--scores={tmp_path / 'f.json'}", f"--coco={SHAPES}"), "made on an image folder: give it as --image_folder"),
        ((f"--scores={tmp_path / 'f.json'}", f"--image_folder={SHAPES / 'classification' / 'val'}"),
         "are not those the scores were made on"),
        ((f"--scores={tmp_path / 'f.json'}",), "give the --coco or the --image_folder"),
        ((f"--scores={tmp_path / 'f.json'}", folder, "--normalize=max"), "drop --normalize and --allocation"),
        ((f"--scores={tmp_path / 'f.json'}", folder, "--candidates=shrink:median"), "bad candidate 'shrink:median'"),
        ((f"--scores={tmp_path / 's.json'}", f"--coco={SHAPES}", "--budget=latency=-10%"), "a latency budget"),
        ((f"--scores={tmp_path / 's.json'}", "--budget=layers=5%"), "or a --mode for layers=5%: zero or remove"),
    ]:
        code, _, err = xprune(capfd, *prune, *args, f"--out={tmp_path / 'bad'}")
        one_line_error(code, err, message)
    detector_scores = tmp_path / "det.json"  # a detector scored label-free: auto has no training loss to go by
    code, _, err = xprune(capfd, "score", f"--model={work / 'det'}", "--criterion=l1", f"--out={detector_scores}")
    assert code == 0, err
    code, _, err = xprune(capfd, "prune", f"--model={work / 'det'}", f"--scores={detector_scores}", f"--coco={SHAPES}",
                          "--budget=flops=-30%", f"--out={tmp_path / 'bad'}")
    one_line_error(code, err, "records none (a calibration-free criterion)")
    from xprune_jax.attribution.score import calibration_images

    drawn = [os.path.basename(p) for p in calibration_images(str(SHAPES), 2, 0)]
    detector_scores.write_text(json.dumps({**json.loads(detector_scores.read_text()), "objective": "confidence",
                                           "calibration": {"images": drawn, "seed": 0, "split": "train2017"}}))
    code, _, err = xprune(capfd, "prune", f"--model={work / 'det'}", f"--scores={detector_scores}", f"--coco={SHAPES}",
                          "--budget=flops=-30%", f"--out={tmp_path / 'bad'}")
    one_line_error(code, err, "these scores used the confidence objective: score with --objective=loss")
    code, _, err = xprune(capfd, "prune", f"--model={work / 'det'}", f"--scores={detector_scores}", folder,
                          "--budget=flops=-30%", f"--out={tmp_path / 'bad'}")
    one_line_error(code, err, "--image_folder calibrates classifiers")
    assert not (tmp_path / "bad").exists()


# --- 3. prune takes only scores of this very model ------------------------------------------------------

def test_prune_refuses_scores_of_another_model(work, tmp_path, capfd):
    code, _, err = xprune(capfd, "score", f"--model={work / 'cls'}", "--criterion=l1", f"--out={tmp_path / 'l1.json'}")
    assert code == 0, err
    scores = json.loads((tmp_path / "l1.json").read_text())
    prune = ("prune", "--mode=remove", "--budget=flops=-10%")
    code, _, err = xprune(capfd, *prune, f"--model={work / 'cls_other'}", f"--scores={tmp_path / 'l1.json'}",
                          f"--out={tmp_path / 'p'}")
    one_line_error(code, err, "made for another model", "run `xprune score` on this model")

    (tmp_path / "old.json").write_text(json.dumps({k: v for k, v in scores.items() if k != "model_fingerprint"}))
    code, _, err = xprune(capfd, *prune, f"--model={work / 'cls'}", f"--scores={tmp_path / 'old.json'}",
                          f"--out={tmp_path / 'p'}")
    one_line_error(code, err, "records no model fingerprint", "run `xprune score` on this model")

    # scores from before a shrink: same layer names, another model
    code, _, err = xprune(capfd, "prune", "--mode=shrink", "--budget=flops=-10%", f"--model={work / 'cls'}",
                          f"--scores={tmp_path / 'l1.json'}", f"--out={tmp_path / 'shrunk'}")
    assert code == 0, err
    code, _, err = xprune(capfd, *prune, f"--model={tmp_path / 'shrunk'}", f"--scores={tmp_path / 'l1.json'}",
                          f"--out={tmp_path / 'p'}")
    one_line_error(code, err, "made for another model")
    assert not (tmp_path / "p").exists()

    # a protected name that is no layer of the model (a typo) would protect nothing
    code, _, err = xprune(capfd, *prune, f"--model={work / 'cls'}", f"--scores={tmp_path / 'l1.json'}",
                          "--protect=stage2,layer9", f"--out={tmp_path / 'p'}")
    one_line_error(code, err, "--protect names no layer or block of this shufflenet_v2_x0_5: layer9;")
    assert not (tmp_path / "p").exists()


# --- 4. a detector is evaluated only against annotations of its own classes ------------------------------

def test_eval_refuses_annotations_of_other_categories(work, tmp_path, capfd, coco_root):
    code, _, err = xprune(capfd, "eval", f"--model={work / 'det'}", f"--coco={coco_root}", f"--out={tmp_path / 'e'}")
    one_line_error(code, err, "category id 1 is 'circle' to the model but 'person' in the annotations")
    assert not (tmp_path / "e").exists()


def test_category_check_for_torchvision_and_ultralytics_numbering(coco_root):
    import torchvision

    from xprune_jax.errors import UserError
    from xprune_jax.evaluation.coco import check_categories, load_ground_truth

    coco = load_ground_truth(str(coco_root / "annotations" / "instances_val2017.json"))
    shapes = load_ground_truth(str(SHAPES / "annotations" / "instances_val2017.json"))
    arch = "fasterrcnn_resnet50_fpn"
    spec = models.get_architecture(arch).default_spec()
    names = list(torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"])
    check_categories(Model(arch, spec, {}, {"categories": names}), coco, "coco")  # ids 1..90 with N/A gaps
    import dataclasses

    small = dataclasses.replace(spec, num_classes=7)
    check_categories(Model(arch, small, {}, {"categories": ["__background__", *CLASSES]}), shapes, "shapes")
    with pytest.raises(UserError, match="category id 1 is 'circle' to the model but 'person'"):
        check_categories(Model(arch, small, {}, {"categories": ["__background__", *CLASSES]}), coco, "coco")
    from converters.ultralytics_io import _coco_names

    check_categories(Model("yolov8n", yolov8_spec("n"), {}, {"preprocess": {"imgsz": 640}, "categories": _coco_names()}),
                     coco, "coco")  # COCO-80 indices map to COCO-91 ids
    with pytest.raises(UserError, match="category id 1 is 'person' to the model but 'circle'"):
        check_categories(Model("yolov8n", yolov8_spec("n"), {}, {"preprocess": {"imgsz": 640}, "categories": _coco_names()}),
                         shapes, "shapes")


# --- 5. bench times every model, each under its own name ------------------------------------------------

def test_bench_labels_models_of_the_same_basename(work, tmp_path, capfd):
    for side in ("a", "b"):
        shutil.copytree(work / "cls", tmp_path / side / "model")
    code, out, err = xprune(capfd, "bench", f"--model={tmp_path / 'a' / 'model'}", f"--model={tmp_path / 'b' / 'model'}",
                            "--repeats=2", "--warmup=1", "--batch_size=1", f"--out={tmp_path / 'bench.json'}")
    assert code == 0, err
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["labels"] == ["a/model", "b/model"] and set(result["summary"]) == {"a/model", "b/model"}
    assert result["summary"]["b/model"]["n"] == 2 and "| a/model |" in out and "| b/model |" in out
    assert "compiling and warming up model 1 of 2" in err and "compiling and warming up model 2 of 2" in err
    assert cli.model_labels(["x/m", "x/m", "y/n"]) == ["m", "m#2", "n"]
    assert cli.model_labels(["a/b/m", "c/b/m/"]) == ["a/b/m", "c/b/m"]
    a, b = tmp_path / "a" / "model", tmp_path / "b" / "model"
    code, _, err = xprune(capfd, "bench", f"--model={a},{b}")  # a list where the flag repeats
    one_line_error(code, err, f"repeat the flag for each model (--model={a} --model={b})")


# --- 6. a config is validated before any work -----------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ('--config.prunings=("shrink:flops=abc",)', "config.prunings 'shrink:flops=abc': bad --budget"),
    ('--config.prunings=("shrink:flops=30%",)', "takes a minus: flops=-30%"),
    ('--config.prunings=("shrink:latency=-30%",)', "a latency budget is `xprune prune`'s"),
    ('--config.prunings=("zero:flops=-10%",)', "zero mode keeps every FLOP"),
    ('--config.prunings=("prune-all",)', "write mode:budget"),
    ('--config.criteria=("shap",)', "unknown criterion 'shap'"),
    ("--config.arch=resnet5", "unknown architecture 'resnet5'"),
    ("--config.experiment=nope", "unknown experiment 'nope'"),
    ("--config.objective=confidence", "does not fit a classification model"),
    ("--config.calib_images=0", "config.calib_images is 0; it must be an integer >= 1"),
    ("--config.bench.repeats=0", "config.bench.repeats is 0"),
    ('--config.seeds=()', "config.seeds is ()"),
    ("--config.coco=/nonexistent", "config.coco '/nonexistent' is not a folder"),
    ('--config.measurements_from=("/nonexistent.json",)', "measurements_from names '/nonexistent.json'"),
    ("--config.calib_images=abc", "config.calib_images"),
    ("--config.prunings=('auto:layers=5%',)", "auto chooses among shrink allocations"),
    ("--config.pruning.candidates=('shrink:median',)", "bad candidate 'shrink:median'"),
    (("--config.recovery.finetune.steps=2", "--config.recovery.finetune.checkpoint_every=0"),
     "config.recovery.finetune.checkpoint_every is 0; it must be an integer >= 1"),
    ("--config.recovery.finetune.steps=2", "config.recovery trains a classifier on labelled images"),
    ("--config.pruning.protect=('stage2','stage9.0')", "--protect names no layer or block of this shufflenet_v2_x0_5: stage9.0;"),
])
def test_run_validates_the_config_first(tmp_path, capfd, override, message):
    out = tmp_path / "run"
    code, _, err = xprune(capfd, "run", f"--config={REPO / 'configs' / 'structural.py'}:shufflenet_v2_x0_5",
                          f"--config.out_dir={out}", *((override,) if isinstance(override, str) else override))
    one_line_error(code, err, message)
    assert not out.exists()


def test_run_refuses_a_model_dir_of_another_architecture(work, tmp_path, capfd):
    code, _, err = xprune(capfd, "run", f"--config={REPO / 'configs' / 'structural.py'}:shufflenet_v2_x0_5",
                          f"--config.weights={work / 'det'}", f"--config.image_folder={SHAPES / 'classification'}",
                          f"--config.out_dir={tmp_path / 'run'}")
    one_line_error(code, err, f"config.weights {work / 'det'} holds a yolov8n model, not a shufflenet_v2_x0_5: give")
    assert not (tmp_path / "run").exists()  # refused before any work


# --- 7. numbers and budgets ------------------------------------------------------------------------------

@pytest.mark.parametrize("command, flag, message", [
    ("eval", "--max_images=-5", "--max_images=-5 is invalid: use an integer >= 0"),
    ("eval", "--batch_size=0", "--batch_size=0 is invalid"),
    ("score", "--calib_images=0", "--calib_images=0 is invalid"),
    ("bench", "--repeats=0", "--repeats=0 is invalid"),
    ("bench", "--warmup=-1", "--warmup=-1 is invalid"),
    ("prune", "--shrink_ratio=1.5", "use a fraction between 0 and 1"),
    ("prune", "--round_to=0", "--round_to=0 is invalid"),
    ("prune", "--budget=flops=30%", "takes a minus: flops=-30%"),
    ("prune", "--budget=params=30%", "takes a minus: params=-30%"),
    ("prune", "--budget=latency=30%", "takes a minus: latency=-30%"),
    ("prune", "--budget=layers=-5%", "without a minus: layers=5%"),
    ("eval", "--mode=shrink", "does not use --mode"),
    ("eval", "--batch_size=abc", "--batch_size=abc"),
    ("eval", "--bogus=1", "Unknown command line flag 'bogus'"),
])
def test_flags_are_checked_before_work(work, tmp_path, capfd, command, flag, message):
    model = f"--model={work / 'det'}"
    required = {"eval": (model, f"--coco={SHAPES}", f"--out={tmp_path / 'o'}"),
                "score": (model, f"--out={tmp_path / 's.json'}"), "bench": (model,),
                "prune": (model, f"--out={tmp_path / 'p'}", f"--scores={tmp_path / 'none.json'}", "--mode=shrink",
                          "--budget=flops=-10%")}[command]
    code, _, err = xprune(capfd, command, *required, flag)
    one_line_error(code, err, message)
    assert not any(tmp_path.iterdir())


# --- tracebacks where a sentence belongs ----------------------------------------------------------------

@pytest.mark.parametrize("command", ["predict", "score", "bench", "eval", "prune", "convert"])
def test_unwritable_out_fails_before_work(work, capfd, command):
    out = "/proc/xprune-cannot-write/out"  # not writable, even by root
    args = {"predict": (f"--model={work / 'cls'}", f"--images={work / 'images'}"), "score": (f"--model={work / 'cls'}",),
            "bench": (f"--model={work / 'cls'}",), "eval": (f"--model={work / 'det'}", f"--coco={SHAPES}"),
            "prune": (f"--model={work / 'cls'}", "--mode=remove", "--budget=flops=-10%",
                      f"--scores={work / 'no-scores.json'}"),
            "convert": ("--arch=shufflenet_v2_x0_5", "--weights=DEFAULT")}[command]
    if command == "prune":
        (work / "no-scores.json").write_text("{}")  # read before the out is checked; checked against the model after
    code, _, err = xprune(capfd, command, *args, f"--out={out}")
    one_line_error(code, err, f"cannot write {out}", "writable place")


def test_full_disk_is_one_line_and_leaves_nothing(work, tmp_path, capfd, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(json, "dump", full)
    code, _, err = xprune(capfd, "score", f"--model={work / 'cls'}", "--criterion=l1", f"--out={tmp_path / 's.json'}")
    one_line_error(code, err, "No space left on device", "free some space")
    assert os.listdir(tmp_path) == []


def test_help(capfd):
    code, out, _ = xprune(capfd, "--help")
    assert code == 0 and all(f"  {name}" in out for name in cli.COMMANDS)
    for flag in ("-h", "--helpshort"):
        assert xprune(capfd, flag)[:2] == (0, out)
    code, out, _ = xprune(capfd, "eval", "--help")
    assert code == 0 and "--max_images=INT" in out and "--mode=" not in out and "--criterion" not in out
    assert "example:\n  xprune eval --model=" in out and "writes:\n  DIR/detections.json" in out
    for name in cli.COMMANDS:  # every command's flags are documented with their defaults
        text = xprune(capfd, name, "--help")[1]
        assert all(f"--{f}=" in text or f"--[no]{f}" in text for f in cli.COMMANDS[name].required + cli.COMMANDS[name].optional)
    code, _, err = xprune(capfd)
    one_line_error(code, err, "no command given", "xprune --help")
    code, _, err = xprune(capfd, "frobnicate")
    one_line_error(code, err, "unknown command 'frobnicate'")


def test_help_and_errors_in_a_real_process(work, tmp_path):
    """The console script agrees with the in-process harness: help exits 0, errors are one line, exit 2."""
    result = xprune_subprocess("eval", "--help")
    assert result.returncode == 0 and "--max_images=INT" in result.stdout and "--mode=" not in result.stdout
    result = xprune_subprocess("eval", f"--model={work / 'det'}", f"--coco={SHAPES}", f"--out={tmp_path / 'e'}",
                               "--max_images=-5")
    one_line_error(result.returncode, result.stderr, "--max_images=-5 is invalid")
    bad = tmp_path / "bad"
    shutil.copytree(work / "cls", bad)
    _truncate_data_files(bad)
    result = xprune_subprocess("predict", f"--model={bad}", f"--images={work / 'images'}", f"--out={tmp_path / 'p.npz'}")
    one_line_error(result.returncode, result.stderr, "the checkpoint is damaged")


def _truncate_data_files(model_dir) -> None:
    for root, _, files in os.walk(model_dir / "variables" / "ocdbt.process_0"):
        for name in files:
            if os.path.basename(root) == "d":
                os.truncate(os.path.join(root, name), 100)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # how pytest reports those tracebacks
def test_damaged_checkpoint_prints_one_line_and_nothing_later(work, tmp_path, capfd):
    """Orbax closes its event loop on the first failed read while others are in flight; their
    completions printed "Event loop is closed" tracebacks after the error (most runs)."""
    bad = tmp_path / "bad"
    shutil.copytree(work / "cls", bad)
    _truncate_data_files(bad)
    for _ in range(3):
        code, _, err = xprune(capfd, "predict", f"--model={bad}", f"--images={work / 'images'}",
                              f"--out={tmp_path / 'p.npz'}")
        one_line_error(code, err, "the checkpoint is damaged")
    time.sleep(0.5)
    assert capfd.readouterr().err == ""


# --- the fuzz: every file the CLI reads, broken in every way, is one line and exit 2 ----------------------

def _model_json_cases():
    def edit(fn):
        def apply(meta):
            meta = json.loads(json.dumps(meta))
            fn(meta)
            return meta
        return apply

    return {
        "empty": lambda text: "", "truncated": lambda text: text[: len(text) // 2], "list": lambda text: "[]",
        "object": lambda text: "{}",
        "no arch": edit(lambda m: m.pop("arch")), "no spec": edit(lambda m: m.pop("spec")),
        "arch number": edit(lambda m: m.update(arch=5)), "unknown arch": edit(lambda m: m.update(arch="nope")),
        "spec string": edit(lambda m: m.update(spec="abc")), "spec type": edit(lambda m: m["spec"].update(type="Nope")),
        "classes string": edit(lambda m: m["spec"].update(num_classes="abc")),
        "units wrong": edit(lambda m: m["spec"].update(units=5)),
        "other arch": edit(lambda m: m.update(arch="resnet18")),
        "narrower": edit(lambda m: m["spec"].update(num_classes=3)),
        "preprocess string": edit(lambda m: m.update(preprocess="x")),
        "no crop": edit(lambda m: m["preprocess"].pop("crop")),
        "std pair": edit(lambda m: m["preprocess"].update(std=[1, 2])),
        "categories dict": edit(lambda m: m.update(categories={})),
        "version": edit(lambda m: m.update(format_version=99)),
    }


MODEL_JSON_CASES = _model_json_cases()


@pytest.mark.parametrize("case", sorted(MODEL_JSON_CASES))
def test_fuzz_model_json(work, tmp_path, capfd, case):
    bad = tmp_path / "m"
    shutil.copytree(work / "cls", bad)
    text = (bad / "model.json").read_text()
    broken = MODEL_JSON_CASES[case](text if case in ("empty", "truncated", "list", "object") else json.loads(text))
    (bad / "model.json").write_text(broken if isinstance(broken, str) else json.dumps(broken))
    code, _, err = xprune(capfd, "predict", f"--model={bad}", f"--images={work / 'images'}", f"--out={tmp_path / 'p.npz'}")
    one_line_error(code, err, str(bad))
    assert not (tmp_path / "p.npz").exists()


def _flip_bytes(path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 64] = bytes(255 - b for b in data[middle: middle + 64])
    path.write_bytes(bytes(data))


VARIABLES_CASES = {
    "no variables": lambda v: shutil.rmtree(v), "empty variables": lambda v: [shutil.rmtree(v), v.mkdir()],
    "no manifest": lambda v: os.remove(v / "manifest.ocdbt"),
    "truncated manifest": lambda v: os.truncate(v / "manifest.ocdbt", 50),
    "truncated metadata": lambda v: os.truncate(v / "_METADATA", 50),
    "garbage metadata": lambda v: (v / "_METADATA").write_text("{no"),
    "flipped data bytes": lambda v: _flip_bytes(max((v / "ocdbt.process_0" / "d").iterdir(), key=os.path.getsize)),
    "no data": lambda v: shutil.rmtree(v / "ocdbt.process_0" / "d"),
    "truncated data": lambda v: _truncate_data_files(v.parent),
    "root index truncated": lambda v: [os.truncate(v / "d" / n, 10) for n in os.listdir(v / "d")],
}


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("case", sorted(VARIABLES_CASES))
def test_fuzz_variables(work, tmp_path, capfd, case):
    bad = tmp_path / "m"
    shutil.copytree(work / "cls", bad)
    VARIABLES_CASES[case](bad / "variables")
    code, _, err = xprune(capfd, "predict", f"--model={bad}", f"--images={work / 'images'}", f"--out={tmp_path / 'p.npz'}")
    one_line_error(code, err, str(bad), "the checkpoint is damaged", "re-create the model")


@pytest.fixture(scope="module")
def scores(work):
    from xprune_jax.attribution.score import score_model

    return score_model(load_model(str(work / "cls")), ["l1"], progress=False)


SCORES_CASES = {
    "empty": "", "truncated": lambda s: json.dumps(s)[:100], "object": "{}", "list": "[]", "number": "3",
    "layers not a list": lambda s: {**s, "layers": {}}, "layer without score": lambda s: {**s, "layers": [{"name": "x"}]},
    "score string": lambda s: {**s, "layers": [{**l, "score": "high"} for l in s["layers"]]},
    "no criterion": lambda s: {k: v for k, v in s.items() if k != "criterion"},
    "other arch": lambda s: {**s, "arch": "resnet18"},
    "fingerprint number": lambda s: {**s, "model_fingerprint": 5},
    "missing layer": lambda s: {**s, "layers": s["layers"][1:]},
    "channel scores string": lambda s: {**s, "layers": [{**l, "channel_scores": "abc"} for l in s["layers"]]},
}


@pytest.mark.parametrize("case", sorted(SCORES_CASES))
def test_fuzz_scores(work, tmp_path, capfd, scores, case):
    broken = SCORES_CASES[case]
    broken = broken(scores) if callable(broken) else broken
    (tmp_path / "s.json").write_text(broken if isinstance(broken, str) else json.dumps(broken))
    code, _, err = xprune(capfd, "prune", f"--model={work / 'cls'}", f"--scores={tmp_path / 's.json'}", "--mode=shrink",
                          "--budget=flops=-10%", f"--out={tmp_path / 'p'}")
    one_line_error(code, err)
    assert not (tmp_path / "p").exists()


PLAN_CASES = {
    "empty": "", "truncated": lambda p: json.dumps(p)[:40], "object": "{}", "list": "[]",
    "missing field": lambda p: {k: v for k, v in p.items() if k != "selected"},
    "unknown field": lambda p: {**p, "colour": "red"},
    "selected string": lambda p: {**p, "selected": "abc"},
    "unknown unit": lambda p: {**p, "selected": ["nope"], "keep_channels": {"nope": [0]}},
    "keep out of range": lambda p: {**p, "keep_channels": {k: [10 ** 6] for k in p["keep_channels"]}},
    "keep not listed": lambda p: {**p, "keep_channels": {}},
    "keep strings": lambda p: {**p, "keep_channels": {k: ["a"] for k in p["keep_channels"]}},
    "flops string": lambda p: {**p, "flops_before": "many"},
    "mode unknown": lambda p: {**p, "mode": "melt"},
}


@pytest.fixture(scope="module")
def plan(work, scores):
    import dataclasses

    from xprune_jax.pruning.plan import make_plan

    return dataclasses.asdict(make_plan(load_model(str(work / "cls")), scores, "shrink", "flops=-10%"))


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_fuzz_plans(work, tmp_path, capfd, plan, case):
    broken = PLAN_CASES[case]
    broken = broken(plan) if callable(broken) else broken
    (tmp_path / "plan.json").write_text(broken if isinstance(broken, str) else json.dumps(broken))
    code, _, err = xprune(capfd, "prune", f"--model={work / 'cls'}", f"--plan={tmp_path / 'plan.json'}",
                          f"--out={tmp_path / 'p'}")
    one_line_error(code, err)
    assert not (tmp_path / "p").exists()


ANNOTATION_CASES = {
    "empty": lambda d: "", "truncated": lambda d: json.dumps(d)[:200], "list": lambda d: [], "object": lambda d: {},
    "no categories": lambda d: {k: v for k, v in d.items() if k != "categories"},
    "no height": lambda d: {**d, "images": [{k: v for k, v in e.items() if k != "height"} for e in d["images"]]},
    "width string": lambda d: {**d, "images": [{**e, "width": "wide"} for e in d["images"]]},
    "images dict": lambda d: {**d, "images": {}},
    "annotation without bbox": lambda d: {**d, "annotations": [{k: v for k, v in a.items() if k != "bbox"}
                                                               for a in d["annotations"]]},
    "bbox short": lambda d: {**d, "annotations": [{**a, "bbox": [1, 2]} for a in d["annotations"]]},
    "category without name": lambda d: {**d, "categories": [{"id": c["id"]} for c in d["categories"]]},
    "other category names": lambda d: {**d, "categories": [{**c, "name": c["name"] + "s"} for c in d["categories"]]},
}


@pytest.mark.parametrize("case", sorted(ANNOTATION_CASES))
def test_fuzz_annotations(work, tmp_path, capfd, case):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").symlink_to(SHAPES / "val2017")
    dataset = json.loads((SHAPES / "annotations" / "instances_val2017.json").read_text())
    broken = ANNOTATION_CASES[case](dataset)
    (root / "annotations" / "instances_val2017.json").write_text(broken if isinstance(broken, str) else json.dumps(broken))
    code, _, err = xprune(capfd, "eval", f"--model={work / 'det'}", f"--coco={root}", f"--out={tmp_path / 'e'}")
    one_line_error(code, err, "instances_val2017.json")
    assert not (tmp_path / "e").exists()


CONFIG_CASES = {
    "missing file": None, "empty file": "", "syntax error": "def get_config(:\n",
    "no get_config": "x = 1\n", "get_config raises": "def get_config():\n    raise ValueError('boom')\n",
    "returns a list": "def get_config():\n    return [1]\n",
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_fuzz_configs(tmp_path, capfd, case):
    path = tmp_path / "config.py"
    if CONFIG_CASES[case] is not None:
        path.write_text(CONFIG_CASES[case])
    missing = CONFIG_CASES[case] is None
    code, _, err = xprune(capfd, "run", f"--config={path}" + (":resnet50" if missing else ""))  # FILE[:ARGUMENT]
    one_line_error(code, err, *([f"--config: no file {path};"] if missing else []))
    assert set(os.listdir(tmp_path)) - {"__pycache__"} == (set() if CONFIG_CASES[case] is None else {"config.py"})


@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "text"])
def test_fuzz_convert_weights(tmp_path, capfd, case):
    path = tmp_path / "w.pth"
    if case != "missing":
        import torch

        torch.save({"conv1.0.weight": torch.zeros(24, 3, 3, 3)}, path)
        data = path.read_bytes()
        path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "text": b"hello"}[case])
    code, _, err = xprune(capfd, "convert", "--arch=shufflenet_v2_x0_5", f"--weights={path}", f"--out={tmp_path / 'm'}")
    one_line_error(code, err)
    assert not (tmp_path / "m").exists()
