"""Issue 19: one fine-tuning step in JAX (``xprune_jax.training.loop.make_train_step``) against the same step
in torch, on this CPU, side by side.

    nice python benchmarks/bench_finetune.py --threads 2 --out benchmarks/results/finetune_cpu.json

Both sides take the same model (random weights, converted from the torch model), the same batch, the same
loss and SGD with momentum 0.9, BatchNorm in train mode, forward + backward + update:

* **YOLOv8n** at 256 px (the fixture's size), batch 8 of real COCO images letterboxed square with their
  ground truth: Ultralytics 8.4.190's ``DetectionModel`` in train mode + ``v8DetectionLoss`` +
  ``torch.optim.SGD`` against the Flax YOLOv8n + the JAX port of that loss + optax SGD.
* **MobileNetV2**, 6 classes at 64 px, batch 32 (the classifier fixtures' recipe): torchvision + cross-entropy
  + ``torch.optim.SGD`` against the Flax MobileNetV2 + cross-entropy + optax SGD.

torch runs eagerly in its default (NCHW) layout and in ``channels_last``; the goal (issue 19) is a JAX step
at most 0.8x the faster torch one. Timed with ``xprune_jax.timing.time_side_by_side`` (warm-up and
compilation excluded, a fresh random order every round, per-round ratios). ``--threads N`` pins the process
to N CPUs before jax starts and gives torch N threads.
"""

from __future__ import annotations

import bench_common


def _parse():
    p = bench_common.parser(__doc__)
    p.add_argument("--out", help="JSON file for the results")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--models", default="yolov8n,mobilenet_v2")
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    bench_common.pin_cpus(ARGS.threads)

import dataclasses  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from converters.mapping import state_dict_to_variables  # noqa: E402
from xprune_jax import models, parallel, runs, timing  # noqa: E402
from xprune_jax.checkpoint import Model, write_json_atomic  # noqa: E402
from xprune_jax.training import objectives  # noqa: E402
from xprune_jax.training.loop import FinetuneConfig, make_optimizer, make_train_step  # noqa: E402

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-4


def _jax_step(model: Model, batch: dict):
    """A zero-argument call running one JAX train step (task loss, SGD), carrying the state along."""
    config = FinetuneConfig(steps=1000, batch_size=len(batch["images"]), lr=LR, optimizer="sgd", momentum=MOMENTUM,
                            weight_decay=WEIGHT_DECAY, warmup_steps=0, clip_norm=0.0,
                            objective=objectives.Objective(distill=0.0, task=1.0))
    mesh = parallel.data_mesh()
    tx = make_optimizer(config, model.arch, model.variables["params"])
    step = make_train_step(model, None, config, tx, mesh)
    state = {"params": model.variables["params"], "batch_stats": model.variables["batch_stats"],
             "opt_state": tx.init(model.variables["params"]), "step": jnp.zeros((), jnp.int32)}
    holder = {"state": jax.device_put(state, parallel.replicated(mesh))}
    batch = jax.device_put(batch, parallel.batch_sharding(mesh))

    def call():
        holder["state"], metrics = step(holder["state"], {}, batch)
        return metrics["loss"]

    return call


def _torch_step(model: torch.nn.Module, inputs: torch.Tensor, loss_fn, channels_last: bool):
    model = model.train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def call():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs))
        loss.backward()
        optimizer.step()
        return None

    return call


def yolov8n_candidates(coco: str, batch_size: int = 8, imgsz: int = 256) -> tuple[dict, dict]:
    import copy

    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.loss import v8DetectionLoss

    from converters.ultralytics_io import DFL_KEY
    from xprune_jax.models.yolov8 import yolov8_spec
    from xprune_jax.training.data import Augmentation, ExampleLoader, coco_split

    torch.manual_seed(0)
    net = DetectionModel("yolov8n.yaml", verbose=False)
    spec = yolov8_spec("n", 80)
    state_dict = {k: v.numpy() for k, v in net.state_dict().items() if k != DFL_KEY and "num_batches" not in k}
    model = Model("yolov8n", spec, state_dict_to_variables(state_dict, models.variable_shapes("yolov8n", spec), "yolov8n"),
                  {"preprocess": {"imgsz": imgsz}})
    data = coco_split(model, coco, "val2017", labelled=True)
    load = ExampleLoader(model, data, batch_size, 0, Augmentation(flip=0.0, jitter=0.0), with_targets=True)
    batch = jax.tree_util.tree_map(lambda *x: np.stack(x), *[load(0, i) for i in range(batch_size)])

    rows = [(i, c, box) for i in range(batch_size) for c, box, m in
            zip(batch["gt_classes"][i], batch["gt_boxes"][i], batch["gt_mask"][i]) if m]
    xyxy = np.array([r[2] for r in rows], np.float32) / imgsz
    xywh = np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                     xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], 1)
    targets = {"batch_idx": torch.tensor([r[0] for r in rows], dtype=torch.float32),
               "cls": torch.tensor([[r[1]] for r in rows], dtype=torch.float32), "bboxes": torch.from_numpy(xywh)}
    inputs = torch.from_numpy(batch["images"]).permute(0, 3, 1, 2).contiguous()

    def torch_call(channels_last):
        torch_model = copy.deepcopy(net)
        torch_model.args = get_cfg()
        criterion = v8DetectionLoss(torch_model)
        return _torch_step(torch_model, inputs, lambda preds: criterion(preds, targets)[0].sum(), channels_last)

    fns = {"jax": _jax_step(model, batch), "torch": torch_call(False), "torch channels_last": torch_call(True)}
    return fns, {"model": "yolov8n", "imgsz": imgsz, "batch": batch_size, "boxes": len(rows),
                 "loss": "v8DetectionLoss (Ultralytics) / its JAX port"}


def mobilenet_v2_candidates(batch_size: int = 32, size: int = 64) -> tuple[dict, dict]:
    import copy

    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(num_classes=6)
    spec = models.get_architecture("mobilenet_v2").default_spec()
    spec = dataclasses.replace(spec, num_classes=6)
    state_dict = {k: v.numpy() for k, v in net.state_dict().items() if "num_batches" not in k}
    variables = state_dict_to_variables(state_dict, models.variable_shapes("mobilenet_v2", spec, size), "mobilenet_v2")
    model = Model("mobilenet_v2", spec, variables, {})
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch_size, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, 6, batch_size).astype(np.int32)
    inputs = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    target = torch.from_numpy(labels).long()
    loss = torch.nn.CrossEntropyLoss()
    fns = {"jax": _jax_step(model, {"images": images, "labels": labels}),
           "torch": _torch_step(copy.deepcopy(net), inputs, lambda out: loss(out, target), False),
           "torch channels_last": _torch_step(copy.deepcopy(net), inputs, lambda out: loss(out, target), True)}
    return fns, {"model": "mobilenet_v2", "size": size, "batch": batch_size, "classes": 6, "loss": "cross-entropy"}


def main(args) -> None:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    results = {"settings": {"lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "repeats": args.repeats,
                            "warmup": args.warmup, "threads": args.threads, "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__}, "models": {}, "environment": runs.environment()}
    for name in args.models.split(","):
        fns, setup = yolov8n_candidates(args.coco) if name == "yolov8n" else mobilenet_v2_candidates()
        times = timing.time_side_by_side(fns, repeats=args.repeats, warmup=args.warmup, seed=args.seed)
        best_torch = min(("torch", "torch channels_last"), key=lambda k: np.median(times[k]))
        summary = timing.summarize(times, best_torch)
        results["models"][name] = {**setup, "baseline": best_torch, "summary": summary,
                                   "goal_met": summary["jax"]["ratio_median"] <= 0.8}
        print(f"{name}: ratio to {best_torch}", file=sys.stderr)
        print(timing.markdown_table(summary, best_torch), file=sys.stderr)
    if args.out:
        write_json_atomic(args.out, results)


if __name__ == "__main__":
    main(ARGS)
