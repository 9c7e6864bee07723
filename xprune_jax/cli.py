"""``xprune COMMAND --flags`` (= ``python -m xprune_jax``): the command-line contract of DESIGN.md.

Every command is a row of :data:`COMMANDS`: the flags it takes, an example and what it writes, which
``xprune COMMAND --help`` prints. Before any work a command checks its flags (a flag it does not
take is an error), its numbers, its input files and that its outputs can be written. Errors are one
line on stderr with exit status 2; they name the problem and the fix. :func:`invoke` runs the CLI in
this process (tests).
"""

import dataclasses
import errno
import os
import sys
import textwrap
from typing import Callable

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from xprune_jax.errors import UserError
from xprune_jax.fileio import read_json

FLAGS = flags.FLAGS
flags.DEFINE_string("arch", None, "Architecture name, e.g. resnet50 or yolov8n.")
flags.DEFINE_string("weights", None, "A torchvision .pth file or weights name (ResNet50_Weights.IMAGENET1K_V1), or an "
                    "Ultralytics .pt file or name.")
flags.DEFINE_multi_string("model", None, "A model directory written by `xprune convert` or `prune`.")
flags.DEFINE_string("images", None, "A folder of images.")
flags.DEFINE_string("out", None, "Where to write the result.")
flags.DEFINE_string("coco", None, "A COCO root laid out like the official download: val2017/, annotations/.")
flags.DEFINE_list("criterion", ["grad_x_act"], "Criteria, comma-separated; the first is the primary one "
                  "(grad_x_act, grad_x_act:mean, grad_x_act:signed, taylor_weight, l1, l1:mean, l2, bn_scale, random).")
flags.DEFINE_string("objective", "", "The scalar attribution explains ('' = the task's default: cross_entropy for "
                    "classifiers; for detectors loss, the training loss, where the calibration split has annotations, else "
                    "confidence).")
flags.DEFINE_string("calib_split", "train2017", "The split of --coco that calibration images come from (val2017 "
                    "overlaps the images `xprune eval` measures).")
flags.DEFINE_string("image_folder", None, "Classifiers: calibrate on a labelled ImageFolder root (<class name>/<image>) "
                    "instead of --coco.")
flags.DEFINE_integer("calib_images", 32, "Calibration images, drawn with --seed.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("scores", None, "A scores file written by `xprune score` on this very model.")
flags.DEFINE_enum("mode", None, ["auto", "zero", "remove", "shrink", "remove+shrink"],
                  "zero: the paper's (no speed-up); remove: depth; shrink: width; remove+shrink: both in one plan; "
                  "auto (the default): of the --candidates allocations, the one whose pruned model has the lowest loss on "
                  "the calibration images the scores were made on (found again in --coco or --image_folder).")
flags.DEFINE_list("candidates", ["shrink:mean", "shrink:max", "shrink:lamp", "remove+shrink:mean"],
                  "--mode=auto: the MODE:NORMALIZE allocations to choose from.")
flags.DEFINE_string("budget", None, "layers=5% (bottom fraction of eligible units), flops=-30%, params=-30%, or "
                    "latency=-30% (measured side by side at --batch_size; remove/shrink).")
flags.DEFINE_list("protect", [], "Extra layers or blocks never to prune (the stem and heads always are; a "
                  "classifier head may read fewer inputs: --protect=layer4 keeps ResNet's).")
flags.DEFINE_string("plan", None, "Apply this plan JSON (e.g. hand-edited) instead of --scores/--mode/--budget.")
flags.DEFINE_enum("allocation", "global", ["global", "layer"], "shrink: rank every channel of every group globally "
                  "(default), or take whole groups by their layer score, each narrowed by --shrink_ratio (the paper's).")
flags.DEFINE_enum("normalize", "mean", ["mean", "max", "lamp", "none"], "Global allocation: how each group's channel "
                  "importances are scaled to compare across groups.")
flags.DEFINE_float("floor", 0.125, "Global allocation: the fraction of its width every group keeps at least.")
flags.DEFINE_float("remove_share", 0.5, "remove+shrink: the share of the budget taken by removing units first.")
flags.DEFINE_float("shrink_ratio", 0.5, "Layer allocation: the fraction of a selected group's channels that shrink "
                   "removes, in (0, 1).")
flags.DEFINE_integer("round_to", 8, "Shrink keeps a multiple of this many channels.")
flags.DEFINE_float("latency_price", 0.0, "Global allocation: divide each group's channel importances by (the seconds "
                   "per FLOP of the layers its channels narrow, each layer timed on this backend, over the model's)^N, "
                   "so that channels slow for their FLOPs go sooner; 0 ranks by importance alone (0.25: see benchmarks/README).")
flags.DEFINE_string("layer_latency", None, "--latency_price: reuse this layer latency table (DIR.layer_latency.json of "
                    "an earlier prune of the same architecture on this backend) instead of measuring one.")
flags.DEFINE_string("export_torch", None, "Also write the pruned model as `xprune export --format=torch` does.")
flags.DEFINE_enum("format", None, ["ultralytics", "torch", "onnx", "jax"], "An Ultralytics .pt (YOLOv8), a torch file "
                  "for converters.load_pruned (torchvision models), ONNX, or a jax.export function (.npz).")
flags.DEFINE_string("input_shape", None, "The preprocessed input B,H,W,3 (jax, onnx); default: the shape the model's "
                    "preprocessing fixes (a classifier's crop, YOLOv8's imgsz) with B=1.")
flags.DEFINE_integer("repeats", 20, "Timed rounds per model.")
flags.DEFINE_integer("warmup", 3, "Untimed calls per model before timing (the first compiles).")
flags.DEFINE_integer("batch_size", 8, "Images per batch (a multiple of the device count: every device of every "
                     "process).")
flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
flags.DEFINE_bool("fuse", False, "YOLOv8: fold every BatchNorm into its conv on conversion.")
flags.DEFINE_bool("trust_pickle", False, "YOLOv8: unpickle a .pt file that needs classes beyond the allow-list; "
                  "this can run code from the file, so only for files you trust.")
flags.DEFINE_integer("max_images", 0, "Evaluate only the first N images of the COCO root (0 = all).")
flags.DEFINE_string("annotations", None, "A COCO instances json whose image ids the results should use.")
flags.DEFINE_integer("train_images", 2000, "Training images to generate.")
flags.DEFINE_integer("val_images", 200, "Validation images to generate.")
flags.DEFINE_integer("image_size", 256, "Side of the generated square images in pixels.")
flags.DEFINE_integer("crop_size", 64, "Side of the classification crops in pixels.")
flags.DEFINE_string("teacher", None, "The unpruned model to distil from (default: the model the plan was applied to, "
                    "recorded by `xprune prune`).")
flags.DEFINE_string("split", "train2017", "The image folder of --coco to train on (annotations/instances_<split>.json "
                    "gives its ground truth).")
flags.DEFINE_integer("steps", None, "Optimiser steps.")
flags.DEFINE_float("lr", 1e-3, "Peak learning rate (linear warm-up over 5% of the steps, then cosine).")
flags.DEFINE_enum("optimizer", "adamw", ["adamw", "sgd"], "AdamW, or SGD with momentum 0.9.")
flags.DEFINE_integer("recalibrate_bn", 0, "First re-estimate the BatchNorm statistics on this many training images.")
flags.DEFINE_string("validation", None, "Where finetune measures the final metric: for a detector a COCO root "
                    "whose val2017 gives AP (default: --coco's, unless --split is val2017), for a classifier a "
                    "labelled ImageFolder (top-1); none to skip.")
flags.DEFINE_integer("checkpoint_every", 100, "Steps between checkpoints (in <out>.checkpoints; a rerun resumes).")
config_flags.DEFINE_config_file("config", None, "An experiment config, e.g. configs/demo.py; override fields with "
                                "--config.FIELD=VALUE.", lock_config=True)
flags.DEFINE_enum("precision", "highest", ["highest", "default", "bfloat16"],
                  "Precision of every model run: highest (float32 throughout; parity and evaluation), default (the "
                  "backend's: TF32 convs and matmuls on recent NVIDIA GPUs, float32 on CPU) or bfloat16 (parameters "
                  "and inputs in bfloat16, post-processing in float32). run: overrides the config's precision.")
flags.DEFINE_string("cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "xprune_jax", "jax"),
                    "JAX's persistent compilation cache ('' disables it).")
flags.DEFINE_string("coordinator_address", None, "Multi-process runs (predict, eval, score, finetune): HOST:PORT where "
                    "process 0 runs the coordinator (auto-detected on Cloud TPU, Slurm and Open MPI).")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many processes take part (1: run alone, even "
                     "where a cluster is detected).")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index, 0 to num_processes - 1 (process 0 "
                     "runs the coordinator and writes the results; the others log to <out>.process<N>.log).")
flags.DEFINE_float("distributed_timeout", 120.0, "Multi-process runs: seconds to wait for every process to join, and "
                   "for a silent process before the others stop with an error.")

SHARED = ("cache_dir", "precision", "coordinator_address", "num_processes", "process_id",
          "distributed_timeout")  # every command
HELP = ("-h", "-help", "--help", "-helpshort", "--helpshort", "-?")
LIMITS = {"batch_size": 1, "calib_images": 1, "repeats": 1, "round_to": 1, "max_images": 0, "warmup": 0, "steps": 1,
          "recalibrate_bn": 0, "checkpoint_every": 1}  # minimums
METAVARS = {"arch": "NAME", "weights": "FILE|NAME", "model": "DIR", "images": "DIR", "coco": "ROOT", "criterion": "C[,C...]",
            "scores": "FILE", "plan": "FILE", "budget": "KIND=N%", "config": "FILE[:ARG]", "image_folder": "DIR",
            "annotations": "FILE", "export_torch": "FILE", "protect": "NAME[,NAME...]", "calib_split": "SPLIT",
            "objective": "NAME", "mode": "auto|zero|remove|shrink|remove+shrink",
            "candidates": "MODE:NORM[,...]", "cache_dir": "DIR", "teacher": "DIR",
            "split": "SPLIT", "coordinator_address": "HOST:PORT", "num_processes": "N", "process_id": "I",
            "distributed_timeout": "SECONDS"}


@dataclasses.dataclass(frozen=True)
class Command:
    run: Callable[[], None]
    summary: str  # one line for `xprune --help`
    required: tuple[str, ...]
    optional: tuple[str, ...]
    example: str
    writes: str
    out: str = "PATH"  # what --out names
    helps: dict = dataclasses.field(default_factory=dict)  # this command's own help of a shared flag
    scales: bool = False  # spreads over the processes of a multi-process run (--num_processes etc.)


def _require(*names: str) -> None:
    missing = [f"--{n}" for n in names if getattr(FLAGS, n) in (None, "", [])]
    if missing:
        raise UserError(f"missing {', '.join(missing)}; see `xprune {_command_name()} --help`")


def _one_model() -> str:
    if len(FLAGS.model) != 1:
        raise UserError(f"this command takes one --model, got {len(FLAGS.model)}")
    return FLAGS.model[0]


def _load_for_use(model_dir: str):
    """A model to run: loaded, with the whole input transform its architecture reads."""
    from xprune_jax.checkpoint import check_preprocess, load_model

    model = load_model(model_dir)
    check_preprocess(model, model_dir)
    return model


def _new_out(path: str) -> None:
    """An --out that must not exist yet (unless --overwrite) and must be writable: checked before the work."""
    from xprune_jax.fileio import check_writable

    if os.path.exists(path) and not FLAGS.overwrite:
        raise UserError(f"{os.path.abspath(path)} already exists: choose another --out or pass --overwrite")
    check_writable(path)


def convert_command() -> None:
    from xprune_jax import models
    from xprune_jax.checkpoint import save_model

    models.get_architecture(FLAGS.arch)
    _new_out(FLAGS.out)
    yolo = FLAGS.arch.startswith("yolov8")
    if FLAGS.fuse and not yolo:
        raise UserError(f"--fuse folds YOLOv8's BatchNorms into its convs; drop it for {FLAGS.arch}")
    try:
        if yolo:
            from converters.ultralytics_io import convert
        else:
            from converters.torchvision_io import convert
    except ImportError as e:
        extra = "yolo" if yolo else "torch"
        raise UserError(f"converting {FLAGS.arch} needs {e.name}; install it with `pip install -e '.[{extra}]'`") from None
    if yolo:
        model = convert(FLAGS.arch, FLAGS.weights, fuse=FLAGS.fuse, trust_pickle=FLAGS.trust_pickle)
    else:
        model = convert(FLAGS.arch, FLAGS.weights)
    save_model(model, FLAGS.out, overwrite=FLAGS.overwrite)
    print(f"wrote {FLAGS.out} ({FLAGS.arch} from {model.meta['provenance']['weights']})")
    if not yolo:
        from converters.torchvision_io import assumption_note

        if (note := assumption_note(model)):
            print(note)


def predict_command() -> None:
    import numpy as np

    from xprune_jax import models, parallel, predict
    from xprune_jax.checkpoint import write_json_atomic
    from xprune_jax.data.images import list_images
    from xprune_jax.fileio import atomic_path, check_writable

    model = _load_for_use(_one_model())
    detector = models.get_architecture(model.arch).task == "detection"
    paths = list_images(FLAGS.images)
    if FLAGS.annotations:
        if not detector:
            raise UserError("--annotations gives detections COCO image ids; a classifier's results have none: drop it")
        from xprune_jax.evaluation.coco import load_ground_truth

        load_ground_truth(FLAGS.annotations)
    check_writable(FLAGS.out)
    if detector:
        from xprune_jax.evaluation.coco import predict_folder

        detections = predict_folder(model, FLAGS.images, FLAGS.batch_size, FLAGS.annotations)
        if parallel.is_main():
            write_json_atomic(FLAGS.out, detections)
            print(f"wrote {FLAGS.out} ({len(detections)} detections)")
        return
    logits = predict.classify(model, paths, FLAGS.batch_size)
    if not parallel.is_main():
        return
    with atomic_path(FLAGS.out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, files=np.asarray([os.path.basename(p) for p in paths]), logits=logits)
    print(f"wrote {FLAGS.out} ({len(paths)} images)")


def eval_command() -> None:
    from xprune_jax.evaluation.coco import evaluate
    from xprune_jax.fileio import check_writable

    model = _load_for_use(_one_model())
    check_writable(FLAGS.out)
    metrics = evaluate(model, FLAGS.coco, FLAGS.out, FLAGS.batch_size, FLAGS.max_images, overwrite=FLAGS.overwrite)
    if metrics is None:  # not process 0 of a multi-process run: process 0 reports
        return
    print(f"wrote {FLAGS.out}: AP {metrics['AP']:.4f}, AP50 {metrics['AP50']:.4f} on {metrics['images']} images")


def score_command() -> None:
    from xprune_jax import models, parallel
    from xprune_jax.attribution.score import draw, score_model
    from xprune_jax.checkpoint import write_json_atomic
    from xprune_jax.data.images import image_folder
    from xprune_jax.fileio import check_writable

    model = _load_for_use(_one_model())
    calibration = None
    if FLAGS.image_folder:
        if FLAGS.coco:
            raise UserError("give --coco or --image_folder, not both: calibration images come from one of them")
        if models.get_architecture(model.arch).task != "classification":
            raise UserError("--image_folder calibrates classifiers; calibrate a detector with --coco and --calib_split")
        paths, labels, _ = image_folder(FLAGS.image_folder, model.meta.get("categories"))
        index = draw(list(range(len(paths))), FLAGS.calib_images, FLAGS.seed)
        calibration = ([paths[i] for i in index], labels[index])
    check_writable(FLAGS.out)
    result = score_model(model, FLAGS.criterion, FLAGS.objective, FLAGS.coco or "", FLAGS.calib_images,
                         FLAGS.batch_size, FLAGS.seed, calibration=calibration, calib_split=FLAGS.calib_split)
    result["model"] = os.path.abspath(_one_model())
    if calibration is not None:
        result["calibration"]["image_folder"] = os.path.abspath(FLAGS.image_folder)
    if not parallel.is_main():
        return
    write_json_atomic(FLAGS.out, result)
    print(f"wrote {FLAGS.out}: {len(result['layers'])} layers, criteria {', '.join(result['criteria'])}, "
          f"objective {result['objective']}")
    for row in result["comparison"]:
        print(f"  {row['a']} vs {row['b']}: Spearman {row['spearman']:+.2f}, Kendall {row['kendall']:+.2f}, "
              f"bottom-{row['bottom_k']} overlap {row['bottom_k_overlap']:.0%}")


def prune_command() -> None:
    import dataclasses

    from xprune_jax.checkpoint import load_model, save_model, write_json_atomic
    from xprune_jax.fileio import check_writable
    from xprune_jax.pruning.latency import parse_latency_budget
    from xprune_jax.pruning.plan import apply_plan, check_scores, make_plan, parse_budget, validate_plan

    out = FLAGS.out.rstrip("/")
    if FLAGS.plan:
        given = [f"--{n}" for n in ("scores", "mode", "budget") if getattr(FLAGS, n)]
        if given:
            raise UserError(f"--plan gives the whole plan; drop {', '.join(given)}")
        plan = _read_plan(FLAGS.plan)
        latency_target = None
    else:
        _require("scores", "budget")
        latency_target = parse_latency_budget(FLAGS.budget)
        if latency_target is not None and _mode() == "auto":
            raise UserError("a latency budget is searched by measuring one allocation; give --mode=shrink, remove or "
                            "remove+shrink with it, or a flops=-N% budget for --mode=auto")
        if latency_target is None:
            parse_budget(FLAGS.budget)
        scores = read_json(FLAGS.scores, "scores file", "make one with `xprune score`")
    if FLAGS.export_torch:
        check_writable(FLAGS.export_torch, "--export_torch")
    if FLAGS.latency_price < 0:
        raise UserError(f"--latency_price={FLAGS.latency_price} is invalid: use 0 (importance alone) or a positive "
                        "exponent, e.g. 0.25")
    if FLAGS.layer_latency and not FLAGS.latency_price:
        raise UserError("--layer_latency is the table --latency_price reads; give --latency_price=N too, or drop it")
    if FLAGS.plan and FLAGS.latency_price:
        raise UserError("--plan gives the whole plan; drop --latency_price")
    if not FLAGS.plan and _mode() == "auto":
        from xprune_jax.pruning.select import parse_candidates

        parse_candidates(FLAGS.candidates)
        if latency_target is None and parse_budget(FLAGS.budget)[0] == "layers":
            raise UserError(f"--mode=auto (the default) chooses among shrink allocations; give it a flops=-N% or "
                            f"params=-N% budget, or a --mode for {FLAGS.budget}: zero or remove")
        if FLAGS["normalize"].present or FLAGS.allocation != "global":
            raise UserError("--mode=auto chooses the normalisation of a global allocation among --candidates; drop "
                            "--normalize and --allocation, or give --mode=shrink")
    _new_out(FLAGS.out)
    model = load_model(_one_model())
    if FLAGS.plan:
        validate_plan(model, plan)
    else:
        check_scores(scores, model)
        loss = _selection_loss(model, scores) if _mode() == "auto" else None  # checked before any layer is timed
        options = {**_plan_options(), **_layer_latency(model)}
        if loss is not None:
            from xprune_jax.pruning.select import select_plan

            plan = select_plan(model, scores, FLAGS.budget, loss, FLAGS.candidates, FLAGS.protect, say=print, **options)
        elif latency_target is None:
            plan = make_plan(model, scores, FLAGS.mode, FLAGS.budget, FLAGS.protect, **options)
        else:
            plan = _plan_for_latency(model, scores, latency_target, options)
    pruned = apply_plan(model, plan)
    if latency_target is not None:  # the plan came from measurements at this precision
        from xprune_jax import precision

        pruned.meta["latency_search"] = {"budget": FLAGS.budget, "batch_size": FLAGS.batch_size,
                                         "precision": precision.current()}
    from xprune_jax.training.teacher import source_record

    pruned.meta["pruned_from"] = source_record(_one_model(), model)  # the default teacher of `xprune finetune`
    save_model(pruned, FLAGS.out, overwrite=FLAGS.overwrite)
    write_json_atomic(out + ".plan.json", dataclasses.asdict(plan))
    if FLAGS.export_torch:
        from xprune_jax.export import export_model

        export_model(pruned, "torch", FLAGS.export_torch, overwrite=True)
    chosen = f", chosen by the calibration loss: normalize {plan.normalize}" if plan.selection else ""
    print(f"wrote {FLAGS.out} ({plan.mode}{chosen}, {len(plan.selected)} units): FLOPs {plan.flops_before / 1e9:.3f}G -> "
          f"{plan.flops_after / 1e9:.3f}G ({plan.flops_after / plan.flops_before - 1:+.1%}), params "
          f"{plan.params_before / 1e6:.2f}M -> {plan.params_after / 1e6:.2f}M; plan in {out}.plan.json")


def _mode() -> str:
    return FLAGS.mode or "auto"


def _selection_loss(model, scores: dict):
    """--mode=auto: ``pruned -> loss`` on the calibration images ``scores`` were made on, drawn again from
    --coco (their split) or --image_folder as `xprune score` drew them and checked by name."""
    from xprune_jax import models
    from xprune_jax.attribution.score import draw, draw_calibration, selection_loss
    from xprune_jax.data.images import image_folder

    record = scores.get("calibration") or {}
    names, seed = record.get("images") or [], record.get("seed")
    if not names or not isinstance(seed, int):
        raise UserError("--mode=auto measures each candidate on the calibration images of the scores, but this scores "
                        "file records none (a calibration-free criterion); score with a data-driven criterion, e.g. "
                        "grad_x_act, or choose --mode=shrink")
    if bool(FLAGS.coco) == bool(FLAGS.image_folder):
        raise UserError("--mode=auto measures each candidate on the images the scores were made on: give the --coco "
                        "or the --image_folder that `xprune score` was given (one of them)")
    if FLAGS.image_folder:
        if models.get_architecture(model.arch).task != "classification":
            raise UserError("--image_folder calibrates classifiers; give a detector's --coco (the scores' split)")
        paths, labels, _ = image_folder(FLAGS.image_folder, model.meta.get("categories"))
        index = draw(list(range(len(paths))), len(names), seed)
        calibration = ([paths[i] for i in index], labels[index])
    else:
        if not record.get("split"):
            raise UserError("these scores were made on an image folder: give it as --image_folder instead of --coco")
        calibration = draw_calibration(FLAGS.coco, len(names), seed, record["split"], scores.get("objective", ""))
    drawn = [os.path.basename(p) for p in calibration[0]]
    if drawn != names:
        raise UserError(f"the calibration images drawn again ({drawn[0]}, ...) are not those the scores were made on "
                        f"({names[0]}, ...); give the --coco or --image_folder that `xprune score` was given")
    return selection_loss(model, scores.get("objective", ""), calibration, FLAGS.batch_size, seed)


def _read_plan(path: str):
    """A plan file as :class:`Plan`, its fields checked (names against the model come later)."""
    from xprune_jax.pruning.plan import Plan

    data = read_json(path, "plan", "make one with `xprune prune --scores=...`")
    fields = {f.name for f in dataclasses.fields(Plan)}
    required = {f.name for f in dataclasses.fields(Plan)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    problem = None
    if not isinstance(data, dict):
        problem = f"it holds a {type(data).__name__}, not an object"
    elif not required <= set(data) <= fields:
        missing, unknown = sorted(required - set(data)), sorted(set(data) - fields)
        problem = f"missing fields {missing}" if missing else f"unknown fields {unknown}"
    else:
        def names(value):
            return isinstance(value, list) and all(isinstance(v, str) for v in value)

        checks = {"mode": isinstance(data["mode"], str), "budget": isinstance(data["budget"], str),
                  "criterion": isinstance(data["criterion"], str), "selected": names(data["selected"]),
                  "protected": names(data["protected"]),
                  "keep_channels": isinstance(data["keep_channels"], dict) and all(
                      isinstance(v, list) and all(isinstance(i, int) and i >= 0 for i in v)
                      for v in data["keep_channels"].values()),
                  **{k: isinstance(data[k], int) and data[k] > 0
                     for k in ("flops_before", "flops_after", "params_before", "params_after")},
                  "allocation": isinstance(data.get("allocation", ""), str),
                  "normalize": data.get("normalize") is None or isinstance(data["normalize"], str),
                  "latency_price": isinstance(data.get("latency_price", 0.0), (int, float)) and data.get("latency_price", 0.0) >= 0,
                  "removed": names(data.get("removed", [])),
                  "selection": data.get("selection") is None or isinstance(data["selection"], dict)}
        wrong = [k for k, ok in checks.items() if not ok]
        if wrong:
            problem = f"field {wrong[0]!r} has the wrong type"
        elif data["mode"] in ("shrink", "remove+shrink") and set(data["selected"]) != set(data["keep_channels"]):
            problem = "shrink plans give keep_channels for exactly the selected groups"
    if problem:
        raise UserError(f"plan {path} is not a plan ({problem}); write one with `xprune prune --scores=...` and edit that")
    return Plan(**data)


def export_command() -> None:
    from xprune_jax.checkpoint import load_model
    from xprune_jax.export import export_model

    model = load_model(_one_model())
    export_model(model, FLAGS.format, FLAGS.out, FLAGS.input_shape, FLAGS.overwrite)
    print(f"wrote {FLAGS.out} ({model.arch} as {FLAGS.format})")


def _plan_options() -> dict:
    return {"shrink_ratio": FLAGS.shrink_ratio, "round_to": FLAGS.round_to, "allocation": FLAGS.allocation,
            "normalize": FLAGS.normalize, "floor": FLAGS.floor, "remove_share": FLAGS.remove_share}


def _layer_latency(model) -> dict:
    """With --latency_price: the plan options that price channels by latency, the table read from
    --layer_latency (checked) or measured now, and written beside the output as DIR.layer_latency.json."""
    if not FLAGS.latency_price:
        return {}
    from xprune_jax.checkpoint import write_json_atomic
    from xprune_jax.pruning.latency import layer_latency, read_layer_latency

    if FLAGS.layer_latency:
        table = read_layer_latency(FLAGS.layer_latency, model, FLAGS.batch_size)
    else:
        print(f"measuring each layer's latency (batch {FLAGS.batch_size}, {FLAGS.repeats} rounds)", flush=True)
        table = layer_latency(model, FLAGS.batch_size, FLAGS.repeats, seed=FLAGS.seed, progress=True)
    write_json_atomic(FLAGS.out.rstrip("/") + ".layer_latency.json", table)
    return {"latency_price": FLAGS.latency_price, "layer_latency": table}


def _plan_for_latency(model, scores: dict, target: float, options: dict):
    """Search the plan by measuring each candidate against ``model`` (batch --batch_size, --repeats
    rounds); the steps go to ``<out>.latency.json``, also when the budget can't be met."""
    from xprune_jax import precision, timing
    from xprune_jax.checkpoint import write_json_atomic
    from xprune_jax.pruning.latency import plan_for_latency

    unpruned = timing.model_call(model, FLAGS.batch_size)

    def measure(pruned) -> float:
        times = timing.time_side_by_side({"unpruned": unpruned, "pruned": timing.model_call(pruned, FLAGS.batch_size)},
                                         FLAGS.repeats, FLAGS.warmup, FLAGS.seed)
        return timing.summarize(times, "unpruned")["pruned"]["ratio_median"]

    steps, met = [], False
    try:
        plan, _ = plan_for_latency(model, scores, FLAGS.mode, target, measure, FLAGS.protect, progress=True, steps=steps,
                                   **options)
        met = True
    finally:
        write_json_atomic(FLAGS.out.rstrip("/") + ".latency.json", {
            "budget": FLAGS.budget, "met": met, "batch_size": FLAGS.batch_size, "precision": precision.current(),
            "repeats": FLAGS.repeats, "warmup": FLAGS.warmup, "seed": FLAGS.seed, "steps": steps})
    return plan


def model_labels(paths: list[str]) -> list[str]:
    """Each model's shortest distinguishing path suffix (``a/model``, ``b/model``); a path given again
    gets ``#2``, ``#3``."""
    parts = {p: os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths}
    distinct = {os.sep.join(p) for p in parts.values()}
    n = next(n for n in range(1, max(map(len, parts.values())) + 1)
             if len({"/".join(p[-n:]) for p in parts.values()}) == len(distinct))
    labels = ["/".join(parts[p][-n:]) for p in paths]
    return [label + (f"#{labels[:i].count(label) + 1}" if label in labels[:i] else "") for i, label in enumerate(labels)]


def bench_command() -> None:
    import jax

    from xprune_jax import parallel, precision, runs, timing
    from xprune_jax.checkpoint import model_fingerprint, write_json_atomic
    from xprune_jax.fileio import check_writable

    for path in FLAGS.model:
        if "," in path and not os.path.isdir(path):
            raise UserError(f"--model={path} is not a folder: repeat the flag for each model "
                            f"({' '.join('--model=' + p for p in path.split(','))})")
    models = [_load_for_use(path) for path in FLAGS.model]
    if FLAGS.out:
        check_writable(FLAGS.out)
    batch_size = parallel.check_batch_size(FLAGS.batch_size, parallel.data_mesh())
    labels = model_labels(FLAGS.model)
    calls = {label: timing.model_call(model, batch_size) for label, model in zip(labels, models)}
    times = timing.time_side_by_side(calls, FLAGS.repeats, FLAGS.warmup, FLAGS.seed, progress=True)
    summary = timing.summarize(times, labels[0])
    print(f"batch {batch_size} on {jax.default_backend()} at precision {precision.current()}, {FLAGS.repeats} rounds "
          f"in random order after {FLAGS.warmup} warm-up calls each:")
    print(timing.markdown_table(summary, labels[0]))
    if FLAGS.out:
        write_json_atomic(FLAGS.out, {"batch_size": batch_size, "precision": precision.current(), "models": FLAGS.model, "labels": labels,
                                      "model_fingerprints": [model_fingerprint(m) for m in models],
                                      "repeats": FLAGS.repeats, "warmup": FLAGS.warmup, "seed": FLAGS.seed,
                                      "summary": summary, "environment": runs.environment()})


def run_command() -> None:
    from xprune_jax import precision, runs
    from xprune_jax.experiments import validated_experiment
    from xprune_jax.fileio import check_writable

    config = FLAGS.config
    if FLAGS["precision"].present or "precision" not in config:
        with config.unlocked():
            config.precision = FLAGS.precision
    precision.set_precision(config.precision)
    experiment = validated_experiment(config)
    check_writable(config.get("out_dir") or os.path.join("runs", "x"), "config.out_dir")
    with runs.open_run(config) as folder:
        results, report = experiment(config, folder)
        runs.finish_run(folder, config, results, report)
    print(f"wrote {os.path.join(folder.path, 'report.md')}")


def finetune_command() -> None:
    from xprune_jax.training.command import run_finetune
    from xprune_jax.training.loop import FinetuneConfig
    from xprune_jax.training.objectives import parse_objective

    if FLAGS.precision == "bfloat16":
        raise UserError("finetune trains float32 parameters: use --precision=highest or default (bfloat16 is for "
                        "running a model: eval, predict, bench)")
    config = FinetuneConfig(steps=FLAGS.steps, batch_size=FLAGS.batch_size, lr=FLAGS.lr, optimizer=FLAGS.optimizer,
                            objective=parse_objective(FLAGS.objective), seed=FLAGS.seed,
                            checkpoint_every=FLAGS.checkpoint_every)
    record = run_finetune(_one_model(), FLAGS.out, config, FLAGS.teacher, FLAGS.coco, FLAGS.split, FLAGS.image_folder,
                          FLAGS.recalibrate_bn, FLAGS.overwrite, validation=FLAGS.validation)
    from xprune_jax import parallel

    if not parallel.is_main():
        return
    metric = record["final"].get("metric")
    measured = f", {metric['name']} {metric['value']:.4f} on {metric['data']}" if metric else ""
    print(f"wrote {FLAGS.out}: {record['steps']} steps, final loss {record['final']['loss']:.4g}{measured}")


def synth_command() -> None:
    from xprune_jax.data.synthetic import make_dataset
    from xprune_jax.fileio import check_writable

    existed = os.path.exists(FLAGS.out)
    if not existed:
        check_writable(FLAGS.out)
    summary = make_dataset(FLAGS.out, FLAGS.coco, FLAGS.seed, FLAGS.train_images, FLAGS.val_images, FLAGS.image_size,
                           FLAGS.crop_size)
    counts = ", ".join(f"{split} {s['images']} images / {s['objects']} objects" for split, s in summary["splits"].items())
    print(f"{'kept' if existed else 'wrote'} {FLAGS.out} ({counts})")


COMMANDS = {
    "convert": Command(
        convert_command, "torchvision or Ultralytics weights -> a model directory",
        ("arch", "weights", "out"), ("fuse", "trust_pickle", "overwrite"),
        "xprune convert --arch=resnet50 --weights=ResNet50_Weights.IMAGENET1K_V2 --out=models/resnet50",
        "a model directory: variables/ (Orbax) and model.json (arch, spec, preprocessing, categories, provenance)",
        out="DIR", helps={"out": "The model directory to write."}),
    "predict": Command(
        predict_command, "run a model on a folder of images",
        ("model", "images", "out"), ("batch_size", "annotations"),
        "xprune predict --model=models/yolov8n --images=photos/ --out=detections.json",
        "classifiers: an .npz with files and logits; detectors: a COCO results json (image_id, file_name, "
        "category_id, bbox [x,y,w,h], score)",
        out="FILE", helps={"out": "The file to write: .npz (classifiers) or .json (detectors)."}, scales=True),
    "eval": Command(
        eval_command, "COCO evaluation of a detector (pycocotools AP) and its latency",
        ("model", "coco", "out"), ("batch_size", "max_images", "overwrite"),
        "xprune eval --model=models/yolov8n --coco=/data/coco --out=runs/eval_yolov8n --max_images=500",
        "DIR/detections.json, DIR/metrics.json (AP ... AR100, the model fingerprint and settings), DIR/latency.json; "
        "a stopped run of the same model and settings resumes from DIR/detections.partial.jsonl",
        out="DIR", helps={"out": "The folder to write the results into.",
                          "overwrite": "Start over instead of resuming a stopped evaluation in --out."}, scales=True),
    "score": Command(
        score_command, "score every layer with attribution criteria on calibration images",
        ("model", "out"), ("criterion", "objective", "coco", "calib_split", "image_folder", "calib_images",
                           "batch_size", "seed"),
        "xprune score --model=models/resnet50 --criterion=grad_x_act,l1 --coco=/data/coco --calib_images=64 "
        "--out=scores.json",
        "a scores json: criteria, objective, calibration (split or image folder, images, seed), the model fingerprint, "
        "and each layer's name, score, kind, params, flops, shape and channel_scores; a comparison of the criteria",
        out="FILE", helps={"out": "The scores json to write.",
                           "seed": "Seed of the calibration draw and of the random criterion."}, scales=True),
    "prune": Command(
        prune_command, "prune a model by its scores under a budget (or apply a plan)",
        ("model", "out"), ("scores", "mode", "budget", "plan", "candidates", "coco", "image_folder", "protect",
                           "allocation", "normalize", "floor", "round_to", "shrink_ratio", "remove_share", "latency_price",
                           "layer_latency", "export_torch", "overwrite", "batch_size", "repeats", "warmup", "seed"),
        "xprune prune --model=models/resnet50 --scores=scores.json --coco=/data/coco --budget=flops=-30% "
        "--out=models/r50_pruned",
        "the pruned model directory DIR, its plan DIR.plan.json (latency budgets: the search in DIR.latency.json; "
        "--latency_price: the layer latency table in DIR.layer_latency.json), and with --export_torch a torch file",
        out="DIR", helps={"out": "The pruned model directory to write.",
                          "seed": "Seed of the timed rounds' order (latency budgets, --latency_price).",
                          "batch_size": "Batch of the timed calls (latency budgets, --latency_price) and of the "
                                        "calibration loss (--mode=auto).",
                          "coco": "--mode=auto: the COCO root the scores' calibration images came from.",
                          "image_folder": "--mode=auto: the image folder the scores' calibration images came from.",
                          "repeats": "Timed rounds per candidate (latency budgets) or per layer (--latency_price).",
                          "warmup": "Untimed calls per candidate before timing (latency budgets)."}),
    "export": Command(
        export_command, "write a (pruned) model for another runtime: Ultralytics, torch, ONNX or a jax.export function",
        ("model", "format", "out"), ("input_shape", "overwrite"),
        "xprune export --model=models/yolov8n_shrink --format=ultralytics --out=yolov8n_shrink.pt",
        "ultralytics: a .pt that YOLO(path) loads (val, predict, export; train with PrunedDetectionTrainer); torch: "
        "{arch, spec, state_dict} for converters.load_pruned; onnx: an ONNX graph; jax: a .npz with the serialized "
        "StableHLO function and its parameters",
        out="FILE", helps={"out": "The file to write.", "overwrite": "Replace an existing --out."}),
    "bench": Command(
        bench_command, "time models side by side (random interleaved order, ratios with IQR)",
        ("model",), ("batch_size", "repeats", "warmup", "seed", "out"),
        "xprune bench --model=models/resnet50 --model=models/r50_remove --batch_size=8",
        "a table on stdout; with --out, a json with every model's latency, ratio to the first, and fingerprint",
        out="FILE", helps={"out": "Also write the timings as json here.", "seed": "Seed of the timed rounds' order.",
                           "model": "A model directory; repeat the flag for several (the first is the baseline)."}),
    "run": Command(
        run_command, "run an experiment from an ml_collections config (report, results, plots)",
        ("config",), (),
        "xprune run --config=configs/demo.py --config.out_dir=runs/demo",
        "a run folder (config.out_dir, else runs/EXPERIMENT-TIME): report.md, results.json, config.json, "
        "environment.json, plots/*.png"),
    "finetune": Command(
        finetune_command, "recover a pruned model's accuracy: distillation from its unpruned teacher and/or the task loss",
        ("model", "out", "steps"), ("teacher", "coco", "split", "image_folder", "objective", "batch_size", "lr",
                                    "optimizer", "recalibrate_bn", "validation", "checkpoint_every", "seed", "overwrite"),
        "xprune finetune --model=models/r50_shrink --coco=/data/coco --steps=2000 --out=models/r50_shrink_ft",
        "a model directory DIR whose provenance names the teacher, the plan, the objective, the optimiser, the steps, "
        "the data, the final loss and the metric on the --validation data; checkpoints in DIR.checkpoints while it "
        "runs (a rerun resumes)",
        out="DIR", helps={"out": "The recovered model directory to write.",
                          "objective": "Weighted terms, e.g. distill=1,task=0.5,feature=0.1,temperature=4 (default: "
                                       "distill=1).",
                          "image_folder": "A labelled ImageFolder (<class name>/<image>) to train a classifier on.",
                          "coco": "A COCO-layout root to train a detector on (its --split).",
                          "batch_size": "Images per step (a multiple of the device count: every device of every "
                                        "process).",
                          "seed": "Seed of the data order, augmentation and initial state.",
                          "overwrite": "Replace an existing --out."}, scales=True),
    "synth": Command(
        synth_command, "generate the seeded synthetic shapes dataset in the COCO layout",
        ("coco", "out"), ("seed", "train_images", "val_images", "image_size", "crop_size"),
        "xprune synth --coco=../shared/coco_val2017_subset --out=data/shapes --seed=0",
        "a COCO-layout dataset DIR: train2017/, val2017/, annotations/, classification/{train,val}/, dataset.json",
        out="DIR", helps={"out": "The dataset folder to write.", "seed": "Seed of the dataset."}),
}


def _command_name() -> str:
    return next((a for a in sys.argv[1:] if not a.startswith("-")), "")


def _flag_line(name: str, required: bool, out: str, help_text: str | None) -> str:
    flag = FLAGS[name]
    metavar = out if name == "out" else METAVARS.get(name, flag.flag_type().upper())
    usage = f"--[no]{name}" if flag.boolean else f"--{name}={metavar}"
    default = "" if required or flag.default in (None, "", []) else f" (default: {flag.default_as_str.strip(chr(39))})"
    text = help_text or flag.help.split(";\n")[0]  # absl appends a note to multi flags
    text = ("(required) " if required else "") + (text.split(": ", 1)[1] if text.startswith("<") else text) + default
    return f"  {usage}\n" + textwrap.fill(text, 100, initial_indent=" " * 6, subsequent_indent=" " * 6)


def command_help(name: str) -> str:
    command = COMMANDS[name]
    usage = " ".join(f"--{n}={command.out if n == 'out' else METAVARS.get(n, 'VALUE')}" for n in command.required)
    lines = [f"xprune {name}: {command.summary}.", "", f"usage: xprune {name} {usage} [flags]", "", "flags:"]
    lines += [_flag_line(flag, flag in command.required, command.out, command.helps.get(flag))
              for flag in command.required + command.optional + SHARED]
    lines += ["", "example:", f"  {command.example}", "", "writes:",
              textwrap.fill(command.writes, 100, initial_indent="  ", subsequent_indent="  "), ""]
    return "\n".join(lines)


def overview() -> str:
    width = max(map(len, COMMANDS))
    return "\n".join([
        "xprune: explainability-inspired layer pruning of detectors and classifiers, in JAX (python -m xprune_jax).",
        "", "usage: xprune COMMAND --flags", "", "commands:",
        *(f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()), "",
        "`xprune COMMAND --help` shows a command's flags, an example and what it writes.",
        "`xprune --helpfull` lists every flag of every command and of absl.", ""])


def _help_or_none(argv: list[str]) -> str | None:
    """The help text ``argv`` asks for, if any."""
    words = [a for a in argv[1:] if not a.startswith("-")]
    if "--helpfull" in argv or "-helpfull" in argv:
        return overview() + "\n" + FLAGS.get_help()
    if any(a in HELP for a in argv[1:]):
        return command_help(words[0]) if words and words[0] in COMMANDS else overview()
    return None


def parse(argv: list[str]) -> str:
    """Parse ``argv`` (``xprune COMMAND --flags``) into FLAGS and check the flags against the command
    before any work; returns the command name. A :class:`UserError` for anything wrong."""
    words = [a for a in argv[1:] if not a.startswith("-")]
    if not words:
        raise UserError(f"no command given; usage: xprune {{{'|'.join(COMMANDS)}}} --flags (`xprune --help` describes them)")
    if words[0] not in COMMANDS:
        raise UserError(f"unknown command {words[0]!r}; choose one of {', '.join(COMMANDS)} (`xprune --help` describes them)")
    name, command = words[0], COMMANDS[words[0]]
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        text = str(e)
        if "Traceback (most recent call last)" in text:  # config_flags quotes the config's own traceback
            text = text.split("Traceback")[0].rstrip(": \n") + ": " + text.strip().splitlines()[-1]
        raise UserError(f"{text}; `xprune {name} --help` lists its flags") from None
    except Exception as e:  # config_flags runs the config file, which can raise anything
        raise UserError(f"cannot load the config ({e.__class__.__name__}: {e}); give a file whose get_config() "
                        "returns an ml_collections ConfigDict") from None
    if len(rest) != 2:
        raise UserError(f"unexpected arguments {' '.join(rest[2:])!r}; flags are written --name=value")
    takes = set(command.required + command.optional + SHARED)
    stray = [n for n in OWN_FLAGS if FLAGS[n].present and n not in takes]
    if stray:
        raise UserError(f"this command does not use --{stray[0]}; its flags: "
                        f"{', '.join('--' + n for n in command.required + command.optional)} (`xprune {name} --help`)")
    _require(*command.required)
    if name == "run":
        _check_config()
    for flag, minimum in LIMITS.items():
        if flag in takes and getattr(FLAGS, flag) < minimum:
            raise UserError(f"--{flag}={getattr(FLAGS, flag)} is invalid: use an integer >= {minimum}")
    for flag, example in (("shrink_ratio", 0.5), ("floor", 0.125), ("remove_share", 0.5)):
        if flag in takes and not 0 < getattr(FLAGS, flag) < 1:
            raise UserError(f"--{flag}={getattr(FLAGS, flag)} is invalid: use a fraction between 0 and 1, e.g. {example}")
    if "lr" in takes and not FLAGS.lr > 0:
        raise UserError(f"--lr={FLAGS.lr} is invalid: use a positive learning rate, e.g. 1e-3")
    from xprune_jax import distributed

    distributed.check_arguments(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                FLAGS.distributed_timeout)
    return name


def _check_config() -> None:
    path = config_flags.get_config_filename(FLAGS["config"]).split(":", 1)[0]  # FILE[:ARGUMENT]
    if not os.path.isfile(path):
        raise UserError(f"--config: no file {os.path.abspath(path)}; give a config file, e.g. "
                        "--config=configs/demo.py or --config=configs/recovery.py:mobilenet_v2 (from the repository)")
    try:
        config = FLAGS.config
        config.get("experiment")  # a config that failed to load raises on use
    except Exception as e:
        raise UserError(f"cannot load the config ({e.__class__.__name__}: {str(e).splitlines()[0]}); give a file "
                        "whose get_config() returns an ml_collections ConfigDict") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"the config file's get_config() returned a {type(config).__name__}, not an ml_collections "
                        "ConfigDict")


OWN_FLAGS = sorted(f.name for f in FLAGS.get_flags_for_module(__name__))


def parse_or_exit(argv: list[str]) -> list[str]:
    """:func:`parse` as absl's flags parser: ``[program, command]``, or one line on stderr and exit 2."""
    try:
        return [argv[0], parse(argv)]
    except UserError as e:
        words = [a for a in argv[1:] if not a.startswith("-")]
        _fail(f"xprune {words[0]}" if words and words[0] in COMMANDS else "xprune", str(e))


def main(argv: list[str]) -> None:
    """Run the parsed command ``argv[1]``; a :class:`UserError` (or an OS error such as a full disk)
    is one line on stderr and exit status 2."""
    from xprune_jax import distributed

    name = argv[1]
    try:
        if FLAGS.cache_dir:
            import jax

            jax.config.update("jax_compilation_cache_dir", FLAGS.cache_dir)
        logging.set_verbosity(logging.WARNING)
        from xprune_jax import precision

        precision.set_precision(FLAGS.precision)
        command = COMMANDS[name]
        with distributed.session(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                 FLAGS.distributed_timeout, name, command.scales, FLAGS.out if command.scales else None):
            command.run()
    except UserError as e:
        _fail(f"xprune {name}", str(e))
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRORS:
            distributed.crash(e)
            raise
        fix = ("free some space or write elsewhere" if e.errno in (errno.ENOSPC, errno.EDQUOT)
               else "check the path's permissions or write elsewhere")
        _fail(f"xprune {name}", f"{e.strerror} ({e.filename or 'while writing'}); {fix}")
    except BaseException as e:  # a bug or an interrupt: a multi-process run must not leave the others waiting
        distributed.crash(e)
        raise


ENVIRONMENT_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def _fail(name: str, message: str) -> None:
    from xprune_jax import distributed

    if distributed.active():  # the other processes stop too, quoting this
        distributed.fail(message)
    print(f"{name}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(2)


def invoke(argv: list[str]) -> int:
    """``xprune argv[1:]`` in this process (flags reset first): its exit status. For tests: the
    caller's precision comes back afterwards (a command sets the process's)."""
    from xprune_jax import precision

    FLAGS.unparse_flags()
    for name in [n for n in FLAGS if n.startswith("config.")]:  # config_flags registers these per parse
        delattr(FLAGS, name)
    sys.modules.pop("config_config", None)  # and loads the file into this module, keeping what it held
    old_argv, sys.argv = sys.argv, list(argv)
    try:
        text = _help_or_none(argv)
        if text is not None:
            print(text)
            return 0
        with precision.use(precision.current()):
            main(parse_or_exit(argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old_argv
    return 0


def run() -> None:
    """The console script: help is printed here (exit 0); everything else goes through absl's app.run."""
    text = _help_or_none(sys.argv)
    if text is not None:
        try:
            print(text, flush=True)
        except BrokenPipeError:  # `xprune --help | head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    app.run(main, flags_parser=parse_or_exit)
