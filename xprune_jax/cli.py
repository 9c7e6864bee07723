"""``xprune COMMAND --flags`` (= ``python -m xprune_jax``): the command-line contract of DESIGN.md.

Errors are one line on stderr with exit status 2; they name the problem and the fix.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from xprune_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("arch", None, "Architecture name, e.g. resnet50 (convert).")
flags.DEFINE_string("weights", None, "A torchvision .pth file or weights name such as ResNet50_Weights.IMAGENET1K_V1.")
flags.DEFINE_multi_string("model", None, "A model directory written by `xprune convert` or `prune` (bench: several).")
flags.DEFINE_string("images", None, "A folder of images (predict).")
flags.DEFINE_string("out", None, "Where to write the result.")
flags.DEFINE_string("coco", None, "A COCO root laid out like the official download: val2017/, annotations/.")
flags.DEFINE_list("criterion", ["grad_x_act"], "Criteria, comma-separated; the first is the primary one "
                  "(grad_x_act, grad_x_act:mean, grad_x_act:signed, l1, l1:mean, random).")
flags.DEFINE_string("objective", "", "The scalar attribution explains ('' = the task's default: cross_entropy).")
flags.DEFINE_integer("calib_images", 32, "Calibration images drawn from --coco (score).")
flags.DEFINE_integer("seed", 0, "Seed of the calibration draw and of the random criterion (synth: of the dataset).")
flags.DEFINE_string("scores", None, "A scores file written by `xprune score` (prune).")
flags.DEFINE_enum("mode", None, ["zero", "remove", "shrink"], "zero: the paper's (no speed-up); remove: depth; shrink: width.")
flags.DEFINE_string("budget", None, "layers=5% (bottom fraction of eligible units), flops=-30%, params=-30%, or "
                    "latency=-30% (measured side by side at --batch_size; remove/shrink).")
flags.DEFINE_list("protect", [], "Extra layers or blocks never to prune (the stem and heads always are; a "
                  "classifier head may read fewer inputs: --protect=layer4 keeps ResNet's).")
flags.DEFINE_string("plan", None, "Apply this plan JSON (e.g. hand-edited) instead of --scores/--mode/--budget.")
flags.DEFINE_float("shrink_ratio", 0.5, "Fraction of a selected group's channels that shrink removes.")
flags.DEFINE_integer("round_to", 8, "Shrink keeps a multiple of this many channels.")
flags.DEFINE_string("export_torch", None, "Also write the model as a torch file {arch, spec, state_dict} (classifiers).")
flags.DEFINE_integer("repeats", 20, "Timed rounds per model (bench, prune with a latency budget).")
flags.DEFINE_integer("warmup", 3, "Untimed calls per model before timing (bench, prune with a latency budget).")
flags.DEFINE_integer("batch_size", 8, "Images per batch (rounded up to a multiple of the device count).")
flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
flags.DEFINE_bool("fuse", False, "YOLOv8: fold every BatchNorm into its conv on conversion (convert).")
flags.DEFINE_bool("trust_pickle", False, "YOLOv8: unpickle a .pt file that needs classes beyond the allow-list; "
                  "this can run code from the file, so only for files you trust (convert).")
flags.DEFINE_integer("max_images", 0, "Evaluate only the first N images of the COCO root (0 = all).")
flags.DEFINE_string("annotations", None, "predict: a COCO instances json whose image ids the results should use.")
flags.DEFINE_integer("train_images", 2000, "Training images to generate (synth).")
flags.DEFINE_integer("val_images", 200, "Validation images to generate (synth).")
flags.DEFINE_integer("image_size", 256, "Side of the generated square images in pixels (synth).")
flags.DEFINE_integer("crop_size", 64, "Side of the classification crops in pixels (synth).")
config_flags.DEFINE_config_file("config", None, "An experiment config, e.g. configs/demo.py (run).", lock_config=True)
flags.DEFINE_enum("precision", "highest", ["highest", "default", "bfloat16"],
                  "Precision of every model run: highest (float32 throughout; parity and evaluation), default (the "
                  "backend's: TF32 convs and matmuls on recent NVIDIA GPUs, float32 on CPU) or bfloat16 (parameters "
                  "and inputs in bfloat16, post-processing in float32). run: overrides the config's precision.")
flags.DEFINE_string("cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "xprune_jax", "jax"),
                    "JAX's persistent compilation cache ('' disables it).")


def _require(*names: str) -> None:
    missing = [f"--{n}" for n in names if getattr(FLAGS, n) in (None, "", [])]
    if missing:
        raise UserError(f"missing {', '.join(missing)}; see `xprune --helpfull`")


def _one_model() -> str:
    if len(FLAGS.model) != 1:
        raise UserError(f"this command takes one --model, got {len(FLAGS.model)}")
    return FLAGS.model[0]


def convert_command() -> None:
    _require("arch", "weights", "out")
    from xprune_jax import models
    from xprune_jax.checkpoint import save_model

    models.get_architecture(FLAGS.arch)
    yolo = FLAGS.arch.startswith("yolov8")
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
    _require("model", "images", "out")
    import numpy as np

    from xprune_jax import models, predict
    from xprune_jax.checkpoint import load_model, write_json_atomic
    from xprune_jax.data.images import list_images
    from xprune_jax.fileio import atomic_path

    model = load_model(_one_model())
    if models.get_architecture(model.arch).task == "detection":
        from xprune_jax.evaluation.coco import predict_folder

        detections = predict_folder(model, FLAGS.images, FLAGS.batch_size, FLAGS.annotations)
        write_json_atomic(FLAGS.out, detections)
        print(f"wrote {FLAGS.out} ({len(detections)} detections)")
        return
    paths = list_images(FLAGS.images)
    logits = predict.classify(model, paths, FLAGS.batch_size)
    with atomic_path(FLAGS.out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, files=np.asarray([os.path.basename(p) for p in paths]), logits=logits)
    print(f"wrote {FLAGS.out} ({len(paths)} images)")


def eval_command() -> None:
    _require("model", "coco", "out")
    from xprune_jax.checkpoint import load_model
    from xprune_jax.evaluation.coco import evaluate

    metrics = evaluate(load_model(_one_model()), FLAGS.coco, FLAGS.out, FLAGS.batch_size, FLAGS.max_images)
    print(f"wrote {FLAGS.out}: AP {metrics['AP']:.4f}, AP50 {metrics['AP50']:.4f} on {metrics['images']} images")


def score_command() -> None:
    _require("model", "out")
    from xprune_jax.attribution.score import score_model
    from xprune_jax.checkpoint import load_model, write_json_atomic

    model = load_model(_one_model())
    result = score_model(model, FLAGS.criterion, FLAGS.objective, FLAGS.coco or "", FLAGS.calib_images,
                         FLAGS.batch_size, FLAGS.seed)
    result["model"] = os.path.abspath(_one_model())
    write_json_atomic(FLAGS.out, result)
    print(f"wrote {FLAGS.out}: {len(result['layers'])} layers, criteria {', '.join(result['criteria'])}, "
          f"objective {result['objective']}")
    for row in result["comparison"]:
        print(f"  {row['a']} vs {row['b']}: Spearman {row['spearman']:+.2f}, Kendall {row['kendall']:+.2f}, "
              f"bottom-{row['bottom_k']} overlap {row['bottom_k_overlap']:.0%}")


def prune_command() -> None:
    _require("model", "out")
    import dataclasses
    import json

    from xprune_jax.checkpoint import load_model, save_model, write_json_atomic
    from xprune_jax.pruning.latency import parse_latency_budget
    from xprune_jax.pruning.plan import Plan, apply_plan, make_plan

    model = load_model(_one_model())
    latency_target = None
    if FLAGS.plan:
        try:
            with open(FLAGS.plan) as f:
                plan = Plan(**json.load(f))
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"cannot read plan {FLAGS.plan} ({e}); write one with `xprune prune --scores=...`") from None
    else:
        _require("scores", "mode", "budget")
        scores = _read_json(FLAGS.scores, "scores file", "`xprune score`")
        latency_target = parse_latency_budget(FLAGS.budget)
        if latency_target is None:
            plan = make_plan(model, scores, FLAGS.mode, FLAGS.budget, FLAGS.protect, FLAGS.shrink_ratio, FLAGS.round_to)
        else:
            plan = _plan_for_latency(model, scores, latency_target)
    pruned = apply_plan(model, plan)
    if latency_target is not None:  # the plan came from measurements at this precision
        from xprune_jax import precision

        pruned.meta["latency_search"] = {"budget": FLAGS.budget, "batch_size": FLAGS.batch_size,
                                         "precision": precision.current()}
    save_model(pruned, FLAGS.out, overwrite=FLAGS.overwrite)
    write_json_atomic(FLAGS.out.rstrip("/") + ".plan.json", dataclasses.asdict(plan))
    if FLAGS.export_torch:
        from converters.torchvision_io import export_torch

        export_torch(pruned, FLAGS.export_torch)
    print(f"wrote {FLAGS.out} ({plan.mode}, {len(plan.selected)} units): FLOPs {plan.flops_before / 1e9:.3f}G -> "
          f"{plan.flops_after / 1e9:.3f}G ({plan.flops_after / plan.flops_before - 1:+.1%}), params "
          f"{plan.params_before / 1e6:.2f}M -> {plan.params_after / 1e6:.2f}M; plan in {FLAGS.out.rstrip('/')}.plan.json")


def _plan_for_latency(model, scores: dict, target: float):
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
        plan, _ = plan_for_latency(model, scores, FLAGS.mode, target, measure, FLAGS.protect, FLAGS.shrink_ratio,
                                   FLAGS.round_to, progress=True, steps=steps)
        met = True
    finally:
        write_json_atomic(FLAGS.out.rstrip("/") + ".latency.json", {
            "budget": FLAGS.budget, "met": met, "batch_size": FLAGS.batch_size, "precision": precision.current(),
            "repeats": FLAGS.repeats, "warmup": FLAGS.warmup, "seed": FLAGS.seed, "steps": steps})
    return plan


def _read_json(path: str, what: str, maker: str):
    import json

    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {what} {path} ({e.__class__.__name__}); make one with {maker}") from None


def bench_command() -> None:
    _require("model")
    import jax

    from xprune_jax import parallel, precision, runs, timing
    from xprune_jax.checkpoint import load_model, write_json_atomic

    batch_size = parallel.round_up_batch(FLAGS.batch_size, parallel.data_mesh())
    calls = {os.path.basename(os.path.normpath(path)): timing.model_call(load_model(path), batch_size) for path in FLAGS.model}
    names = list(calls)
    summary = timing.summarize(timing.time_side_by_side(calls, FLAGS.repeats, FLAGS.warmup, FLAGS.seed), names[0])
    print(f"batch {batch_size} on {jax.default_backend()} at precision {precision.current()}, {FLAGS.repeats} rounds "
          f"in random order after {FLAGS.warmup} warm-up calls each:")
    print(timing.markdown_table(summary, names[0]))
    if FLAGS.out:
        write_json_atomic(FLAGS.out, {"batch_size": batch_size, "precision": precision.current(), "models": FLAGS.model,
                                      "summary": summary, "environment": runs.environment()})


def run_command() -> None:
    _require("config")
    from xprune_jax import precision, runs
    from xprune_jax.experiments import get_experiment

    config = FLAGS.config
    if FLAGS["precision"].present or "precision" not in config:
        with config.unlocked():
            config.precision = FLAGS.precision
    precision.set_precision(config.precision)
    experiment = get_experiment(config.experiment)
    run_dir = runs.start_run(config)
    results, report = experiment(config, run_dir)
    runs.finish_run(run_dir, results, report)
    print(f"wrote {os.path.join(run_dir, 'report.md')}")


def synth_command() -> None:
    _require("coco", "out")
    from xprune_jax.data.synthetic import make_dataset

    existed = os.path.exists(FLAGS.out)
    summary = make_dataset(FLAGS.out, FLAGS.coco, FLAGS.seed, FLAGS.train_images, FLAGS.val_images, FLAGS.image_size,
                           FLAGS.crop_size)
    counts = ", ".join(f"{split} {s['images']} images / {s['objects']} objects" for split, s in summary["splits"].items())
    print(f"{'kept' if existed else 'wrote'} {FLAGS.out} ({counts})")


COMMANDS = {"convert": convert_command, "predict": predict_command, "eval": eval_command, "score": score_command, "prune": prune_command,
            "bench": bench_command, "run": run_command, "synth": synth_command}


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: xprune {{{'|'.join(COMMANDS)}}} --flags (got {' '.join(argv[1:]) or 'nothing'})")
    if FLAGS.cache_dir:
        import jax

        jax.config.update("jax_compilation_cache_dir", FLAGS.cache_dir)
    logging.set_verbosity(logging.WARNING)
    from xprune_jax import precision

    precision.set_precision(FLAGS.precision)
    try:
        COMMANDS[argv[1]]()
    except UserError as e:
        print(f"xprune {argv[1]}: error: {e}", file=sys.stderr)
        sys.exit(2)


def run() -> None:
    app.run(main)
