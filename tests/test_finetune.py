"""Recovery: train-mode BatchNorm against torch, BN recalibration, self-distillation, the jitted train step,
data parallelism, exact resume after a kill, and the one-line errors of `xprune finetune`.

Small shapes throughout: a 4-block ResNet (torchvision's ``ResNet(BasicBlock, [1, 1, 1, 1])``, 3 classes) at
32 px, and a fused YOLOv8n (no BatchNorm) at 64 px."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from converters.mapping import state_dict_to_variables
from tests.conftest import REPO
from tests.test_cli import xprune
from xprune_jax import models, predict
from xprune_jax.checkpoint import Model, load_model, save_model
from xprune_jax.data.images import image_folder
from xprune_jax.errors import UserError
from xprune_jax.models.layers import BatchNorm
from xprune_jax.models.resnet import ResidualBlockSpec, ResNetSpec
from xprune_jax.training import data as training_data
from xprune_jax.training import objectives
from xprune_jax.training.command import validation_data
from xprune_jax.training.loop import FinetuneConfig, finetune, make_optimizer, make_train_step
from xprune_jax.training.recalibrate import recalibrate_bn

SIZE = 32
CLASSES = ("a", "b", "c")
PREPROCESS = {"resize": SIZE, "crop": SIZE, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def tiny_spec(num_classes: int = 3, bn_eps: float = 1e-5) -> ResNetSpec:
    blocks = tuple(ResidualBlockSpec(f"layer{i + 1}.0", (w,), w, 1 if i == 0 else 2, i > 0)
                   for i, w in enumerate((64, 128, 256, 512)))
    return ResNetSpec("basic", 64, blocks, num_classes, bn_eps)


def tiny_model(seed: int = 0, **spec_kwargs) -> Model:
    spec = tiny_spec(**spec_kwargs)
    variables = models.init_variables("resnet18", spec, seed=seed, input_size=SIZE)
    return Model("resnet18", spec, variables, {"preprocess": PREPROCESS, "categories": list(CLASSES)})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A labelled ImageFolder (each class tinted by one channel) and the tiny model's directory."""
    tmp = tmp_path_factory.mktemp("finetune")
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        (tmp / "folder" / name).mkdir(parents=True)
        for i in range(6):
            image = rng.integers(0, 256, (SIZE, SIZE, 3))
            image[..., k] = 255
            Image.fromarray(image.astype(np.uint8)).save(tmp / "folder" / name / f"{i}.png")
    save_model(tiny_model(), str(tmp / "model"))
    return tmp


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(UserError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# --- BatchNorm ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, 0.03])
def test_train_mode_batch_norm_matches_torch(momentum):
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (4, 5, 6, 7)).astype(np.float32)
    weight, bias = rng.uniform(0.5, 2, 7).astype(np.float32), rng.normal(size=7).astype(np.float32)
    mean, var = rng.normal(size=7).astype(np.float32), rng.uniform(0.5, 2, 7).astype(np.float32)
    bn = torch.nn.BatchNorm2d(7, eps=1e-3, momentum=momentum).train()
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(weight)), bn.bias.copy_(torch.from_numpy(bias))
        bn.running_mean.copy_(torch.from_numpy(mean)), bn.running_var.copy_(torch.from_numpy(var))
    want = bn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()

    variables = {"params": {"scale": weight, "bias": bias}, "batch_stats": {"mean": mean, "var": var}}
    module = BatchNorm(epsilon=1e-3, momentum=momentum)
    got, state = module.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(got, want, atol=2e-6)
    np.testing.assert_allclose(state["batch_stats"]["mean"], bn.running_mean.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state["batch_stats"]["var"], bn.running_var.numpy(), rtol=1e-6)  # unbiased

    # inference is flax's BatchNorm bit for bit; a frozen BN (eps 0: FrozenBN) ignores train mode
    inference = module.apply(variables, x)
    assert np.array_equal(inference, nn.BatchNorm(use_running_average=True, epsilon=1e-3).apply(variables, x))
    frozen = BatchNorm(epsilon=0.0, frozen=True)
    out, state = frozen.apply(variables, x, mutable=["batch_stats"])
    assert np.array_equal(out, frozen.apply(variables, x))
    assert np.array_equal(state["batch_stats"]["var"], var)
    grads = jax.grad(lambda p: frozen.apply({**variables, "params": p}, x, mutable=["batch_stats"])[0].sum())(
        variables["params"])
    assert not any(np.any(g) for g in jax.tree_util.tree_leaves(grads))


def _torch_tiny(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=num_classes)


def test_recalibration_restores_scrambled_statistics():
    """torch's recipe (train mode, momentum None, no gradient) and recalibrate_bn agree on every BatchNorm,
    whatever statistics the model had."""
    net = _torch_tiny()
    spec = tiny_spec()
    state_dict = {k: v.numpy() for k, v in net.state_dict().items()}
    variables = state_dict_to_variables(state_dict, models.variable_shapes("resnet18", spec, SIZE), "tiny resnet")
    images = np.random.default_rng(1).normal(size=(12, SIZE, SIZE, 3)).astype(np.float32)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    net.train()
    with torch.no_grad():
        for start in range(0, 12, 4):
            net(torch.from_numpy(images[start:start + 4]).permute(0, 3, 1, 2))
    want = state_dict_to_variables({k: v.numpy() for k, v in net.state_dict().items()},
                                   models.variable_shapes("resnet18", spec, SIZE), "tiny resnet")["batch_stats"]
    rng = np.random.default_rng(2)
    scrambled = jax.tree_util.tree_map(lambda a: rng.uniform(0.1, 5, np.shape(a)).astype(np.float32),
                                       variables["batch_stats"])
    model = Model("resnet18", spec, {**variables, "batch_stats": scrambled}, {})
    far = max(np.abs(a - b).max() for a, b in zip(jax.tree_util.tree_leaves(scrambled), jax.tree_util.tree_leaves(want)))
    assert far > 0.5  # the test can fail
    recalibrated = recalibrate_bn(model, images, batch_size=4, progress=False)
    for (path, got), expected in zip(jax.tree_util.tree_flatten_with_path(recalibrated.variables["batch_stats"])[0],
                                     jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))
    assert recalibrated.meta["recalibrate_bn"]["bn_layers"] == 12 and recalibrated.meta["recalibrate_bn"]["images"] == 12


@pytest.mark.parametrize("arch", ["yolov8n", "retinanet_resnet50_fpn"])
def test_flipped_examples_carry_mirrored_boxes(arch, coco_root):
    """Host augmentation: a flipped example's ground truth (network-input pixels, through the model's own
    letterbox or resize) is the mirror of the unflipped one's."""
    spec = models.get_architecture(arch).default_spec()
    if arch == "yolov8n":
        model = Model(arch, spec, {}, {"preprocess": {"imgsz": 128}})
    else:
        model = Model(arch, dataclasses.replace(spec, transform=dataclasses.replace(spec.transform, min_size=96,
                                                                                    max_size=128)), {}, {})
    data = training_data.coco_split(model, str(coco_root), "val2017")
    data = dataclasses.replace(data, paths=data.paths[:1], targets=data.targets[:1])
    examples = {flip: training_data.ExampleLoader(model, data, 1, 0, training_data.Augmentation(flip, 0.0), True)(0, 0)
                for flip in (0.0, 1.0)}
    plain, flipped = examples[0.0], examples[1.0]
    n = int(plain["gt_mask"].sum())
    assert n > 0 and np.array_equal(plain["gt_mask"], flipped["gt_mask"])
    if arch == "yolov8n":
        width = plain["images"].shape[1]  # the letterbox centres the image: mirror about the canvas
    else:
        width = int(np.any(plain["images"] != 0, axis=(0, 2)).sum())  # zero padding right of the resized image
    mirrored = np.stack([width - flipped["gt_boxes"][:n, 2], flipped["gt_boxes"][:n, 1],
                         width - flipped["gt_boxes"][:n, 0], flipped["gt_boxes"][:n, 3]], axis=1)
    np.testing.assert_allclose(mirrored, plain["gt_boxes"][:n], atol=1.0)
    assert np.abs(plain["gt_boxes"][:n, 0] - flipped["gt_boxes"][:n, 0]).max() > 2  # the flip did something


# --- objectives --------------------------------------------------------------------------------------------

def _heads(name: str, rng) -> dict:
    r = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    if name == "classifier":
        return {"logits": r(2, 5)}
    if name == "yolov8":
        return {"boxes": r(2, 30, 64), "logits": r(2, 30, 3)}
    if name == "retinanet":
        return {"logits": r(2, 30, 3), "deltas": r(2, 30, 4)}
    rois = jnp.where(jnp.arange(6)[None, :, None] < 4, jnp.abs(r(2, 6, 4)), 0.0)
    return {"objectness": r(2, 30), "rpn_deltas": r(2, 30, 4), "rois": rois, "rois_valid": jnp.any(rois != 0, -1),
            "rois_logits": r(2, 6, 4), "rois_deltas": r(2, 6, 4, 4)}


@pytest.mark.parametrize("name, family", [
    ("classifier", objectives.Classifier), ("yolov8", objectives.YOLOv8Family),
    ("retinanet", objectives.RetinaNetFamily), ("fasterrcnn", objectives.FasterRCNNFamily)])
def test_distillation_into_itself_is_zero_with_zero_gradient(name, family):
    from xprune_jax.models.yolov8 import yolov8_spec

    fam = family(yolov8_spec("n", 3) if name == "yolov8" else None, None)
    objective = objectives.Objective(temperature=2.0)
    teacher = _heads(name, np.random.default_rng(0))
    floats = {k: v for k, v in teacher.items() if v.dtype == jnp.float32 and k != "rois"}

    def loss(student):
        return sum(fam.distill({**teacher, **student}, teacher, objective).values())

    value, grads = jax.jit(jax.value_and_grad(loss))(floats)
    assert abs(float(value)) < 1e-6
    assert all(float(jnp.abs(g).max()) < 1e-6 for g in jax.tree_util.tree_leaves(grads))
    shifted = jax.tree_util.tree_map(lambda x: 1.5 * x + 0.3, floats)  # (softmax ignores a shift)
    assert float(jax.jit(loss)(shifted)) > 1e-3  # not zero for another student
    features = {"p3": teacher[next(iter(floats))]}
    value, grad = jax.value_and_grad(lambda f: objectives.feature_loss(f, features))(features)
    assert float(value) == 0 and not np.any(grad["p3"])


def test_model_distilled_into_itself_has_zero_loss_and_gradient():
    """The whole objective of a model (train mode, FrozenBN so train mode is inference) distilled from itself."""
    model = tiny_model(bn_eps=0.0)
    loss = objectives.objective_loss(objectives.family(model.arch, model.spec), objectives.family(model.arch, model.spec),
                                     objectives.Objective(distill=1.0, temperature=3.0))
    images = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    (value, (terms, _)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        model.variables["params"], model.variables["batch_stats"], model.variables, {"images": images})
    assert float(value) == 0.0 and float(terms["distill"]) == 0.0
    assert max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(grads)) < 1e-7  # rounding of sum(p) = 1


def test_objective_parsing():
    assert objectives.parse_objective("") == objectives.Objective()
    assert objectives.parse_objective("task") == objectives.Objective(distill=0.0, task=1.0)
    assert objectives.parse_objective("distill=2,feature=0.5,temperature=4") == objectives.Objective(2.0, 0.5, 0.0, 4.0)
    _raises("bad --objective term 'kd'", objectives.parse_objective, "kd")
    _raises("turns every term off", objectives.parse_objective, "distill=0")


# --- the train step ----------------------------------------------------------------------------------------

def test_jitted_step_lowers_the_loss_of_yolov8():
    """A fused YOLOv8n (no BatchNorm, so its own teacher gives exactly zero distillation) trained on a fixed
    batch with distillation and Ultralytics' loss: the distillation starts at 0 and the loss falls."""
    from xprune_jax import parallel
    from xprune_jax.models.yolov8 import fuse_batch_norms, yolov8_spec

    spec = yolov8_spec("n", num_classes=3)
    spec, variables = fuse_batch_norms(spec, models.init_variables("yolov8n", spec, input_size=64))
    model = Model("yolov8n", spec, variables, {"preprocess": {"imgsz": 64}})
    config = FinetuneConfig(steps=6, batch_size=2, lr=2e-3, warmup_steps=0,
                            objective=objectives.Objective(distill=1.0, task=1.0))
    mesh = parallel.data_mesh()
    tx = make_optimizer(config, model.arch, variables["params"])
    step = make_train_step(model, model, config, tx, mesh)
    rng = np.random.default_rng(0)
    boxes = np.zeros((2, 8, 4), np.float32)
    boxes[:, :2] = [[8, 8, 40, 40], [24, 16, 60, 56]]
    batch = {"images": rng.uniform(size=(2, 64, 64, 3)).astype(np.float32), "gt_boxes": boxes,
             "gt_classes": np.tile(np.array([0, 2, 0, 0, 0, 0, 0, 0], np.int32), (2, 1)),
             "gt_mask": np.tile(np.arange(8) < 2, (2, 1))}
    # placed on the mesh as `finetune` places it (the step's outputs are): one compile serves every step
    state = parallel.replicate({"params": variables["params"], "batch_stats": {}, "opt_state": tx.init(variables["params"]),
                                "step": jnp.zeros((), jnp.int32)}, mesh)
    variables = parallel.replicate(variables, mesh)
    losses, distill = [], []
    for _ in range(config.steps):
        state, metrics = step(state, variables, batch)
        losses.append(float(metrics["loss"]))
        distill.append(float(metrics["distill"]))
    assert distill[0] == 0.0 and distill[-1] > 0
    assert losses[-1] < 0.7 * losses[0], losses


# --- data parallelism, resume ------------------------------------------------------------------------------

DATA_PARALLEL = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    jax.config.update("jax_compilation_cache_dir", sys.argv[2])
    from tests.test_finetune import tiny_model
    from xprune_jax import parallel
    from xprune_jax.training import data, objectives
    from xprune_jax.training.loop import FinetuneConfig, finetune

    assert len(jax.devices()) == 2, jax.devices()
    student, teacher = tiny_model(0), tiny_model(1)
    for model in (student, teacher):  # 64 px: layer4's BatchNorms see 2x2 maps, not 1x1 (ill-conditioned)
        model.meta["preprocess"] = {**model.meta["preprocess"], "resize": 64, "crop": 64}
    config = FinetuneConfig(steps=3, batch_size=4, lr=1e-3, optimizer="sgd",
                            objective=objectives.Objective(distill=1.0, task=1.0))
    params = {}
    for n in (1, 2):
        mesh = parallel.data_mesh(jax.devices()[:n])
        model, record = finetune(student, teacher, data.labelled_folder(student, sys.argv[1]), config, mesh=mesh,
                                 progress=False)
        assert record["devices"] == n
        params[n] = model.variables
    leaves = lambda tree: jax.tree_util.tree_leaves(tree)  # noqa: E731
    diff = max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(leaves(params[2]), leaves(params[1]))
               if np.abs(b).max() > 0)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(leaves(params[1]["params"]), leaves(student.variables["params"])))
    print(json.dumps({"relative_difference": diff, "moved": moved}))
""")


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", **extra}


def test_data_parallel_equals_one_device(workdir):
    """Two host devices (the batch split in halves, BatchNorm statistics over the whole batch) give the
    parameters that one device gives, to float tolerance. SGD: Adam's per-element normalisation turns
    rounding noise in near-zero gradients into updates of order lr, so it agrees only to ~1e-3. Compiled as
    users compile (not as the other tests, without LLVM's optimisation: then the one-device step rounds the
    near-cancelling gradients of layer3's and layer4's BN biases differently, 4% of their tiny movement)."""
    result = subprocess.run([sys.executable, "-c", DATA_PARALLEL, str(workdir / "folder"), str(REPO / ".cache" / "jax")],
                            capture_output=True, text=True, cwd=REPO,
                            env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["moved"] > 1e-4  # training changed the parameters
    assert numbers["relative_difference"] < 1e-5, numbers


def _finetune_args(workdir, out, *extra) -> list[str]:
    return ["finetune", f"--model={workdir / 'model'}", f"--teacher={workdir / 'model'}", f"--image_folder={workdir / 'folder'}",
            "--steps=16", "--batch_size=4", "--lr=1e-3", "--objective=distill,task", "--checkpoint_every=2", f"--out={out}",
            *extra]


def test_resume_after_kill_gives_the_uninterrupted_parameters(workdir):
    out = workdir / "resumed"
    checkpoints, log = workdir / "resumed.checkpoints", workdir / "resumed.log"  # a file: a pipe nobody reads fills
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "xprune_jax", *_finetune_args(workdir, out),
                                    f"--cache_dir={REPO / '.cache' / 'jax'}"], stdout=subprocess.DEVNULL,
                                   stderr=stderr, cwd=REPO, env=_env())
    deadline = time.time() + 300
    while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        assert process.poll() is None, log.read_text()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not out.exists()
    # The training seconds before the kill carry over: make them long enough to tell apart.
    run = max((p for p in checkpoints.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)) / "run" / "metadata"
    saved = json.loads(run.read_text())
    run.write_text(json.dumps({**saved, "seconds": saved["seconds"] + 1000.0}))
    result = xprune(*_finetune_args(workdir, out, f"--validation={workdir / 'folder'}"))
    resumed = load_model(str(out))
    record = resumed.meta["finetune"][-1]
    assert record["resumed_from"] and record["resumed_from"] % 2 == 0
    assert record["seconds"] >= saved["seconds"] + 1000.0
    paths, labels, _ = image_folder(str(workdir / "folder"), list(CLASSES))  # the final metric is the model's top-1
    top1 = float(np.mean(predict.classify(resumed, paths, 4, progress=False).argmax(-1) == labels))
    assert record["final"]["metric"] == {"name": "top1", "value": top1, "data": str(workdir / "folder"),
                                         "images": len(paths)}
    assert f"top1 {top1:.4f} on {workdir / 'folder'}" in result.stdout
    assert record["teacher"]["model"] == str(workdir / "model") and record["steps"] == 16
    assert not checkpoints.exists()  # removed once the model is written

    student = load_model(str(workdir / "model"))
    config = FinetuneConfig(steps=16, batch_size=4, lr=1e-3, objective=objectives.Objective(distill=1.0, task=1.0))
    uninterrupted, _ = finetune(student, student, training_data.labelled_folder(student, str(workdir / "folder")),
                                config, progress=False)
    for path, a, b in zip(jax.tree_util.tree_flatten_with_path(resumed.variables)[0],
                          jax.tree_util.tree_leaves(resumed.variables), jax.tree_util.tree_leaves(uninterrupted.variables)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path[0]))


# --- errors ------------------------------------------------------------------------------------------------

def test_bad_inputs_get_one_line_errors(workdir, tmp_path):
    student = tiny_model()
    data = training_data.labelled_folder(student, str(workdir / "folder"))
    config = FinetuneConfig(steps=2, batch_size=4)
    other = Model("mobilenet_v2", models.get_architecture("mobilenet_v2").default_spec(), {}, {})
    _raises("the teacher is a mobilenet_v2 but the model is a resnet18", finetune, student, other, data, config)
    _raises("the teacher predicts 5 classes but the model 3", finetune, student, tiny_model(num_classes=5), data, config)
    _raises("distillation needs a teacher", finetune, student, None, data, config)
    _raises("--steps must be at least 1", finetune, student, student, data, dataclasses.replace(config, steps=0))
    _raises("--lr must be a positive number", finetune, student, student, data, dataclasses.replace(config, lr=float("nan")))
    _raises("labelled image folder /nonexistent does not exist", training_data.labelled_folder, student, "/nonexistent")
    _raises("COCO root /nonexistent does not exist", training_data.coco_split, student, "/nonexistent")
    _raises("has no train2017/ folder", training_data.coco_split, student, str(workdir))
    unlabelled = training_data.TrainingSet("coco", str(workdir), "folder", data.paths)
    _raises("the task loss needs labels", finetune, student, student, unlabelled,
            dataclasses.replace(config, objective=objectives.Objective(distill=0.0, task=1.0)))
    _raises("labelled image folder /nonexistent does not exist", validation_data, student, None, "", "/nonexistent")
    detector = Model("yolov8n", models.get_architecture("yolov8n").default_spec(), {}, {})
    _raises("the validation data .* has no val2017", validation_data, detector, None, "train2017", str(workdir))
    assert validation_data(detector, str(workdir), "train2017", None) is None  # no val2017 annotations: none by default
    assert validation_data(student, None, "", None) is None and validation_data(detector, "x", "", "none") is None
    checkpoints, every_step = str(tmp_path / "checkpoints"), dataclasses.replace(config, checkpoint_every=1)
    finetune(student, student, data, every_step, checkpoints, progress=False)  # leaves its checkpoint of step 1
    _raises(r"the checkpoints in .*checkpoints belong to a run with another config\.lr \(0\.001 there, 0\.002 here\); "
            r"remove them, or write this run elsewhere", finetune, student, student, data,
            dataclasses.replace(every_step, lr=2e-3), checkpoints, progress=False)


def test_default_teacher_is_the_recorded_source(workdir, tmp_path):
    from xprune_jax.training.teacher import resolve_teacher, source_record

    source = load_model(str(workdir / "model"))
    pruned = Model(source.arch, source.spec, source.variables, {"pruned_from": source_record(str(workdir / "model"), source)})
    teacher, record = resolve_teacher(pruned, None)
    assert record == pruned.meta["pruned_from"] and teacher.arch == source.arch
    _raises("records no model it was pruned from", resolve_teacher, Model(source.arch, source.spec, {}, {}), None)
    save_model(tiny_model(seed=3), str(tmp_path / "changed"))
    changed = {"pruned_from": {**pruned.meta["pruned_from"], "model": str(tmp_path / "changed")}}
    _raises("has changed since the model was pruned from it", resolve_teacher, dataclasses.replace(pruned, meta=changed), None)
    gone = {"pruned_from": {**pruned.meta["pruned_from"], "model": str(tmp_path / "gone")}}
    _raises("is gone; pass --teacher", resolve_teacher, dataclasses.replace(pruned, meta=gone), None)


def test_divergence_stops_naming_the_step_and_the_last_good_checkpoint(workdir, tmp_path):
    student = tiny_model()
    data = training_data.labelled_folder(student, str(workdir / "folder"))
    config = FinetuneConfig(steps=6, batch_size=4, lr=1e30, optimizer="sgd", warmup_steps=2, checkpoint_every=1,
                            objective=objectives.Objective(distill=0.0, task=1.0))
    message = _raises(r"the loss became (nan|inf) at step \d; the last good checkpoint is step \d in ", finetune,
                      student, None, data, config, checkpoint_dir=str(tmp_path / "ckpt"), progress=False)
    step = int(message.split(" at step ")[1].split(";")[0])
    assert f"is step {step - 1} in" in message and (tmp_path / "ckpt" / str(step - 1)).is_dir()


def test_cli_errors_are_one_line(workdir):
    result = xprune(*_finetune_args(workdir, workdir / "never", "--steps=0"), check=False)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "--steps=0 is invalid: use an integer >= 1" in result.stderr
    result = xprune(*_finetune_args(workdir, workdir / "never", "--precision=bfloat16"), check=False)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "finetune trains float32 parameters" in result.stderr and not (workdir / "never").exists()
