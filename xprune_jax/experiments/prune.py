"""The ``prune`` experiment: the whole pipeline for one model. Score every layer with every
criterion (once per calibration seed: other seeds, other calibration images), prune under every
mode and budget, then measure what each pruned network keeps and what it gains, and report it.

What it keeps is measured on data the model did not see in calibration:
- classifiers with a labelled ImageFolder (``config.image_folder``: ``train/`` for calibration,
  ``val/`` for evaluation): top-1 accuracy, and top-1 agreement with the unpruned model;
- classifiers without labels (``config.coco``'s ``val2017/`` images): top-1 agreement (fidelity);
- detectors: pycocotools AP on ``config.coco`` (calibration from ``config.calib_split``).

What it gains: FLOPs and parameters from the plan, and latency measured side by side with the
unpruned model (interleaved in random order, warm-up excluded, per-round ratios with IQR). A plan
equal to one already measured (l1 plans alike for every seed) reuses that measurement.

Every measurement is written to ``measurements.json`` in the run folder as soon as it is made, so a
long table that stops part-way goes on where it stopped: run the same config into the same
``out_dir`` with ``resume=True``. Scores are recomputed (seeded, so the plans come out the same) and
only plans not yet measured are measured; a recovery's fine-tuning checkpoints into the run folder and
resumes from there. ``measurements_from`` adds other runs' measurement files
the same way, so one table can be split over processes or machines (by criteria or seeds) and
gathered by a last run of the whole config, which measures only what none of them did. A reused
measurement must come from the same model measured the same way: the weights' sha256, the
evaluation settings and the unpruned model's metrics must all match. A run into the folder of a
finished run writes its scores, models and plots aside and moves them in with its results
(:class:`runs.RunFolder`), so one that stops leaves the finished run as it was.
"""

import functools
import hashlib
import json
import os
import sys

import jax
import numpy as np
import tqdm
from scipy import stats

from xprune_jax import analysis, models, parallel, precision, predict, runs, timing
from xprune_jax.attribution.compare import compare
from xprune_jax.attribution.score import calibration_images, draw, score_model, selection_loss
from xprune_jax.checkpoint import save_model, write_json_atomic
from xprune_jax.data.images import image_folder, list_images, load_rgb
from xprune_jax.errors import UserError
from xprune_jax.experiments.common import check_weights_arch, prepare_model
from xprune_jax.experiments.registry import register
from xprune_jax.fileio import differences, locked_directory
from xprune_jax.pruning.plan import MODES, apply_plan, check_protect, make_plan
from xprune_jax.pruning.select import CANDIDATES, select_plan
from xprune_jax.spec import spec_to_dict


def validate(config) -> None:
    """Check every field the experiment reads before any work (a bad budget would otherwise make every
    row "infeasible"): one :class:`UserError` naming the field and the fix."""
    from xprune_jax.attribution.criteria import get_criterion
    from xprune_jax.attribution.objectives import get_objective
    from xprune_jax.pruning.plan import parse_budget

    def field(name, kind, minimum=None):
        value = config
        for part in name.split("."):
            value = value.get(part) if hasattr(value, "get") else None
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool or (
                minimum is not None and value < minimum):
            want = {int: "an integer", str: "a string", bool: "True or False"}.get(kind, "a tuple")
            want += f" >= {minimum}" if minimum is not None else ""
            raise UserError(f"config.{name} is {value!r}; it must be {want}")
        return value

    if not isinstance(config.get("arch"), str):
        raise UserError(f"config.arch is {config.get('arch')!r}; give an architecture name such as resnet50")
    architecture = models.get_architecture(config.arch)
    check_weights_arch(config.arch, field("weights", str))
    for name in ("coco", "image_folder", "out_dir"):
        field(name, str)
    for path in ("coco", "image_folder"):
        if config[path] and not os.path.isdir(config[path]):
            raise UserError(f"config.{path} {config[path]!r} is not a folder; point it at an existing one ('' = the default)")
    if config.image_folder:
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(config.image_folder, split)):
                raise UserError(f"config.image_folder {config.image_folder!r} has no {split}/; give an ImageFolder root "
                                "with train/ (calibration) and val/ (evaluation)")
    if architecture.task == "detection":
        split = field("calib_split", str)
        if not os.path.isdir(os.path.join(config.coco or runs.DEMO_COCO, split)):
            raise UserError(f"config.calib_split {split!r} is not a folder of {config.coco or runs.DEMO_COCO}; "
                            "choose a split it has (val2017 overlaps the images evaluation measures)")
    criteria = field("criteria", (tuple, list))
    if not criteria:
        raise UserError("config.criteria is empty; give at least one, e.g. ('grad_x_act', 'l1')")
    for criterion in criteria:
        if not isinstance(criterion, str):
            raise UserError(f"config.criteria holds {criterion!r}; criteria are names such as 'grad_x_act'")
        get_criterion(criterion)
    get_objective(field("objective", str), architecture.task, config.arch, architecture.default_spec())
    prunings = field("prunings", (tuple, list))
    if not prunings:
        raise UserError("config.prunings is empty; give at least one, e.g. ('remove:flops=-10%',)")
    for pruning in prunings:
        mode, _, budget = pruning.partition(":") if isinstance(pruning, str) else ("", "", "")
        if mode not in (*MODES, "auto") or not budget:
            raise UserError(f"config.prunings holds {pruning!r}; write mode:budget with a mode of {', '.join(MODES)} or "
                            "auto, e.g. 'shrink:flops=-30%'")
        try:
            kind, _ = parse_budget(budget)
        except UserError as e:
            raise UserError(f"config.prunings {pruning!r}: {e}") from None
        if mode == "zero" and kind != "layers":
            raise UserError(f"config.prunings {pruning!r}: zero mode keeps every FLOP; use zero:layers=N%")
        if mode == "auto" and kind == "layers":
            raise UserError(f"config.prunings {pruning!r}: auto chooses among shrink allocations; give it a flops=-N% "
                            "or params=-N% budget")
        if mode == "auto" and architecture.task == "detection" and config.objective == "confidence":
            raise UserError(f"config.prunings {pruning!r}: auto chooses by the calibration images' training loss; "
                            "set config.objective to 'loss' (or '' on an annotated split), or use shrink")
    seeds = field("seeds", (tuple, list))
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise UserError(f"config.seeds is {seeds!r}; give a tuple of integer seeds, e.g. (0, 1, 2)")
    field("seed", int)
    for name, minimum in (("calib_images", 1), ("batch_size", 1), ("eval_images", 0), ("bench.batch_size", 1),
                          ("bench.repeats", 1), ("bench.warmup", 0)):
        field(name, int, minimum)
    for name in ("save_models", "resume"):
        field(name, bool)
    if "pruning" in config:
        from xprune_jax.pruning.plan import ALLOCATIONS, NORMALIZATIONS

        for name, choices in (("allocation", ALLOCATIONS), ("normalize", NORMALIZATIONS)):
            if config.pruning.get(name) not in choices:
                raise UserError(f"config.pruning.{name} is {config.pruning.get(name)!r}; choose one of {', '.join(choices)}")
        for name in ("floor", "shrink_ratio", "remove_share"):
            value = config.pruning.get(name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
                raise UserError(f"config.pruning.{name} is {value!r}; it must be a fraction between 0 and 1")
        field("pruning.round_to", int, 1)
        price = config.pruning.get("latency_price", 0.0)
        if not isinstance(price, (int, float)) or isinstance(price, bool) or price < 0:
            raise UserError(f"config.pruning.latency_price is {price!r}; use 0 (importance alone) or a positive exponent, e.g. 0.25")
        if config.pruning.get("layer_latency") and not price:
            raise UserError("config.pruning.layer_latency is the table latency_price reads; set config.pruning.latency_price too, or drop it")
        if config.pruning.get("layer_latency") and not os.path.isfile(config.pruning.layer_latency):
            raise UserError(f"config.pruning.layer_latency: no file {config.pruning.layer_latency}; give a table "
                            "`xprune prune --latency_price=N` wrote, or drop it")
        if price and config.pruning.get("allocation") != "global":
            raise UserError("config.pruning.latency_price prices channels in the global allocation; set "
                            "config.pruning.allocation='global', or drop it")
        if "candidates" in config.pruning:
            from xprune_jax.pruning.select import parse_candidates

            parse_candidates(field("pruning.candidates", (tuple, list)))
        auto = [p for p in prunings if p.startswith("auto:")]
        if auto and config.pruning.get("allocation") != "global":
            raise UserError(f"config.prunings {auto[0]!r}: auto chooses among global allocations; set "
                            "config.pruning.allocation='global'")
        protect = field("pruning.protect", (tuple, list))
        if not all(isinstance(p, str) for p in protect):
            raise UserError("config.pruning.protect must list layer or block names, e.g. ('model.22',)")
        if protect:  # names of the architecture's full-width layers (a pruned model's are checked once loaded)
            spec = architecture.default_spec()
            check_protect((l.name for l in analysis.describe_layers(config.arch, spec, architecture.input_size)),
                          protect, config.arch)
    if _recovers(config):
        from xprune_jax.training.loop import OPTIMIZERS
        from xprune_jax.training.objectives import parse_objective

        field("recovery.recalibrate_bn", int, 0)
        field("recovery.finetune.steps", int, 0)
        field("recovery.finetune.batch_size", int, 2)
        field("recovery.finetune.checkpoint_every", int, 1)
        parse_objective(field("recovery.finetune.objective", str))
        if config.recovery.finetune.optimizer not in OPTIMIZERS:
            raise UserError(f"config.recovery.finetune.optimizer is {config.recovery.finetune.optimizer!r}; choose one "
                            f"of {', '.join(OPTIMIZERS)}")
        for name in ("lr", "weight_decay"):
            value = config.recovery.finetune.get(name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (name == "lr" and not value):
                raise UserError(f"config.recovery.finetune.{name} is {value!r}; it must be a positive number")
        if architecture.task == "classification" and not config.image_folder:
            raise UserError("config.recovery trains a classifier on labelled images: set config.image_folder (its train/)")
    for source in config.get("measurements_from", ()):
        if not isinstance(source, str) or not os.path.isfile(source):
            raise UserError(f"config.measurements_from names {source!r}, which is not a file; give the measurements.json "
                            "of a run of the same model and config")


@register("prune", validate=validate)
def prune_experiment(config, folder: runs.RunFolder) -> tuple[dict, str]:
    coco = config.coco or runs.DEMO_COCO
    task_eval = {"classification": _ClassifierEval, "detection": _DetectionEval}[models.get_architecture(config.arch).task]
    is_model_dir = os.path.isfile(os.path.join(config.weights or "", "model.json"))
    _say(f"prune: {'loading' if is_model_dir else 'converting'} {config.arch} from "
         f"{'seeded random weights' if config.weights == 'random' else config.weights}")
    model, _ = prepare_model(config.arch, config.weights, task_eval.model_images(config, coco), config.seed, folder,
                             config.get("trust_pickle", False))
    evaluator = task_eval(config, coco, model)
    measurements_file, sources = _resume_file(config, folder, MEASUREMENTS), tuple(config.get("measurements_from", ()))
    for path in sources + ((measurements_file,) if config.resume and os.path.exists(measurements_file) else ()):
        read_measurements(path, _measurement_context(config, model), ignore=("unpruned_metrics",))  # before the long work
    unpriced = plan_options(config)
    check_protect((l.name for l in analysis.describe_layers(model.arch, model.spec, analysis.input_size(model))),
                  unpriced.get("protect", ()), model.arch)  # a pruned model's: every plan would call a wrong name infeasible
    priced = ({**unpriced, "latency_price": config.pruning.latency_price,
               "layer_latency": run_layer_latency(config, model, folder)}
              if config.get("pruning", {}).get("latency_price") else unpriced)  # for the PRICED_MODES
    recovery = (Recovery(config, model, evaluator, os.path.join(folder.path, CHECKPOINTS) if config.resume else None)
                if _recovers(config) else None)
    _say(f"prune: evaluating the unpruned model on {len(evaluator.paths)} images (the first call compiles it)")
    unpruned = evaluator(model)
    # a plan's content -> its evaluation: a calibration-free criterion (l1) plans alike for every seed
    evaluated = Measurements(measurements_file, _measurement_context(config, model, unpruned),
                             resume=config.resume, sources=sources)
    reference = reference_recovery(recovery, model, evaluated)
    rows, scores_by_seed = [], {}
    # the bar counts pruned models done (measured, reused or infeasible); its label says what runs now
    bar = tqdm.tqdm(total=len(config.seeds) * len(config.criteria) * len(config.prunings), unit="model", desc="prune")
    for seed in config.seeds:
        bar.set_description(f"seed {seed}: scoring {config.calib_images} images with {', '.join(config.criteria)}")
        scores = score_model(model, list(config.criteria), config.objective, calibration=evaluator.calibration(seed),
                             batch_size=config.batch_size, seed=seed, progress=False, all_channel_scores=True)
        write_json_atomic(os.path.join(folder.out, "scores", f"seed{seed}.json"), scores)
        scores_by_seed[seed] = scores
        selection = None  # auto's loss on this seed's calibration images, made when first asked for
        for criterion in scores["criteria"]:
            single = {**scores, "criterion": criterion, "layers": [
                {**l, "score": l["scores"][criterion], "channel_scores": l["channel_scores_by"][criterion],
                 "input_channel_scores": l["input_channel_scores_by"][criterion]} for l in scores["layers"]]}
            for pruning in config.prunings:
                mode, budget = pruning.split(":", 1)
                row = {"criterion": criterion, "mode": mode, "budget": budget, "seed": seed}
                bar.set_description(f"seed {seed}: planning {criterion} {pruning}")
                try:
                    options = priced if mode in PRICED_MODES else unpriced
                    if mode == "auto":
                        selection = selection or selection_loss(model, scores["objective"], evaluator.calibration(seed),
                                                                config.batch_size, seed)
                        plan = select_plan(model, single, budget, selection,
                                           config.get("pruning", {}).get("candidates", CANDIDATES), **options)
                    else:
                        plan = make_plan(model, single, mode, budget, **options)
                except UserError as e:  # e.g. a budget that the eligible units can't meet
                    rows.append({**row, "infeasible": str(e)})
                    bar.update()
                    continue
                key = plan_key(plan.mode, plan)  # auto's choice shares the measurement of the same plan asked for
                measured, pruned = evaluated.get(key), None
                if measured is None:
                    bar.set_description(f"seed {seed}: measuring {criterion} {pruning}")
                    pruned = apply_plan(model, plan)
                    metrics, latency = evaluator(pruned, timed_against=unpruned)
                    measurement = {"metrics": metrics, "latency": latency}
                    if recovery:
                        bar.set_description(f"seed {seed}: recovering {criterion} {pruning}")
                        measurement["recovery"] = recovery(pruned, key)
                    measured = evaluated.put(key, measurement)
                if config.save_models:  # every row's model, also one measured before a crash but not yet saved
                    name = f"{criterion}_{mode}_{budget}_seed{seed}".replace(":", "-").replace("=", "").replace("%", "pct")
                    model_dir = os.path.join(folder.out, "models", name)
                    if pruned is not None or not os.path.isfile(os.path.join(model_dir, "model.json")):
                        save_model(pruned or apply_plan(model, plan), model_dir, overwrite=True)
                metrics, latency = measured["metrics"], measured["latency"]
                rows.append({**row, "selected": plan.selected, "metrics": metrics,
                             **({"selection": plan.selection} if plan.selection else {}),
                             **({"recovery": measured["recovery"]} if "recovery" in measured else {}),
                             "flops_ratio": plan.flops_after / plan.flops_before,
                             "params_ratio": plan.params_after / plan.params_before,
                             "latency_ratio": latency["ratio_median"], "latency_ratio_iqr": latency["ratio_iqr"]})
                bar.update()
    bar.set_description("prune", refresh=False)
    bar.close()
    evaluated.save()  # a gathering run that measured nothing new still keeps every measurement it used
    if evaluated.resumed:
        print(f"resumed: {evaluated.resumed} of {len(evaluated.entries)} measurements came from earlier runs")
    _say("prune: writing the plots and the report")
    first = scores_by_seed[config.seeds[0]]
    comparison = layer_comparison(first)
    _plot_scores(first, os.path.join(folder.out, "plots", "layer_scores.png"))
    _plot_ranks(first, comparison, os.path.join(folder.out, "plots", "criteria_ranks.png"))
    _plot_tradeoff(rows, evaluator.metric, os.path.join(folder.out, "plots", "tradeoff.png"))
    results = {"arch": model.arch, "weights": model.meta.get("provenance", {}).get("weights"),
               "metric": evaluator.metric, "metric_description": evaluator.description,
               "unpruned": {"metrics": unpruned.metrics,
                            "latency_ms": _median([t for m in evaluated.entries.values() if "latency" in m
                                                   for t in m["latency"]["unpruned_ms"]]),
                            **({"recovery": reference} if reference else {})},
               "comparison": comparison, "rows": rows, "summary": summarize(rows, evaluator.metric)}
    return results, _report(results, config)


MEASUREMENTS = "measurements.json"
CHECKPOINTS = "checkpoints"  # with resume: each fine-tuning's checkpoints, in a folder named by its measurement key
LAYER_LATENCY = "layer_latency.json"
REFERENCE = "unpruned"  # the measurements' key of the unpruned model recovered alike (plan keys are sha256 hex)


def reference_recovery(recovery: "Recovery | None", model, evaluated: "Measurements", say=None) -> dict | None:
    """The unpruned model put through the same recovery, where fine-tuning trains on labels: the task
    loss can lift an unpruned model too, so a pruned model's fine-tuned metric is judged beside it.
    (Distillation alone has nothing to teach the unpruned model: it is its own teacher.) ``say`` announces
    the work (default: a progress line on stderr)."""
    if not (recovery and recovery.config.finetune.steps and recovery.finetune_config().objective.task):
        return None
    measured = evaluated.get(REFERENCE)
    if measured is None:
        (say or _say)("prune: recovering the unpruned model alike (the reference for fine-tuning on labels)")
        measured = evaluated.put(REFERENCE, {"recovery": recovery(model, REFERENCE)})
    return measured["recovery"]


def reference_metric(unpruned: dict, metric: str) -> float | None:
    """The metric a results file's ``unpruned`` entry records for the unpruned model fine-tuned alike
    (None where recovery had no task loss)."""
    return unpruned.get("recovery", {}).get("finetuned", {}).get("metrics", {}).get(metric)


def unpruned_label(name: str, metric: str, unpruned: dict) -> str:
    """``name (top-1 97.2%)`` for a results file's ``unpruned`` entry, naming the unpruned model fine-tuned
    alike (``; fine-tuned alike ...``) where there is one."""
    alike = reference_metric(unpruned, metric)
    return (f"{name} ({'top-1' if metric == 'top1' else metric} {format_metric(metric, unpruned['metrics'][metric])}"
            + (f"; fine-tuned alike {format_metric(metric, alike)}" if alike is not None else "") + ")")


def _say(message: str) -> None:
    """A progress line on stderr, beside the progress bar (which it does not break)."""
    tqdm.tqdm.write(message, file=sys.stderr)


def plan_options(config) -> dict:
    """:func:`make_plan`'s options from the config's ``pruning`` fields (defaults: the library's)."""
    fields = ("protect", "allocation", "normalize", "floor", "round_to", "shrink_ratio", "remove_share")
    return {k: (tuple(config.pruning[k]) if k == "protect" else config.pruning[k])
            for k in fields if k in config.get("pruning", {})}


PRICED_MODES = ("shrink", "remove+shrink", "auto")  # the modes whose global channel allocation a latency price applies to


def run_layer_latency(config, model, folder: runs.RunFolder) -> dict:
    """The layer latency table a run's latency-priced plans read: ``config.pruning.layer_latency``, else the
    run folder's own (``layer_latency.json``, reused on resume), else measured now and written with the
    run's artefacts; a reused table is checked against the model and the backend."""
    from xprune_jax.pruning.latency import layer_latency, read_layer_latency

    path = config.pruning.get("layer_latency") or _resume_file(config, folder, LAYER_LATENCY)
    if config.pruning.get("layer_latency") or (config.resume and os.path.isfile(path)):
        return read_layer_latency(path, model, config.bench.batch_size)
    _say(f"prune: measuring each layer's latency for latency_price (batch {config.bench.batch_size})")
    table = layer_latency(model, config.bench.batch_size, seed=config.seed, progress=True)
    write_json_atomic(path, table)
    return table


def _resume_file(config, folder: runs.RunFolder, name: str) -> str:
    """Where a file a resumed run reuses lives: with ``config.resume`` in the run folder itself (it only
    grows, by keyed entries made in the same context, so a finished run's results stay true), otherwise
    with the run's other artefacts."""
    return os.path.join(folder.path if config.resume else folder.out, name)


def plan_key(mode: str, plan) -> str:
    """A plan's content (mode, units, kept channels) as a short stable key: plans alike, keys alike."""
    content = [mode, plan.selected, plan.keep_channels] + ([plan.removed] if plan.removed else [])
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _measurement_context(config, model, unpruned: "_Evaluated | None" = None) -> dict:
    """What a measurement depends on besides its plan: a resumed run must match it exactly (without
    ``unpruned``: all of it but the unpruned model's metrics, known before the evaluation)."""
    return json.loads(json.dumps({
        "arch": model.arch, "weights_sha256": model.meta.get("provenance", {}).get("sha256"),
        "spec": spec_to_dict(model.spec), "eval_images": config.eval_images, "bench": config.bench.to_dict(),
        **({"pruning": {k: v for k, v in config.pruning.to_dict().items()  # unpriced: as before the price existed
                        if k != "candidates"  # what auto chose among: its choice is a plan, measured by its key
                        and (k not in ("latency_price", "layer_latency") or config.pruning.get("latency_price"))}}
           if "pruning" in config else {}),
        **({"recovery": recovery_settings(config.recovery.to_dict())} if _recovers(config) else {}),
        "seed": config.seed, "precision": precision.current(),
        **({"unpruned_metrics": unpruned.metrics} if unpruned is not None else {})}))


def recovery_settings(recovery: dict) -> dict:
    """A config's ``recovery`` fields less what may change between a run and its resume (how often it
    checkpoints): what a recovered measurement depends on."""
    from xprune_jax.training.loop import RESUMABLE_SETTINGS

    return {**recovery, "finetune": {k: v for k, v in recovery["finetune"].items() if k not in RESUMABLE_SETTINGS}}


def read_measurements(path: str, context: dict, ignore: tuple[str, ...] = ()) -> dict:
    """The entries of a measurements file made in ``context`` (its fields in ``ignore`` aside), else a
    :class:`UserError` that names each field that differs, with both values where they are short."""
    try:
        with open(path) as f:
            saved = json.load(f)
        made_in, entries = saved["context"], saved["entries"]
        if not (isinstance(made_in, dict) and isinstance(entries, dict)):
            raise ValueError("context and entries must be objects")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot reuse the measurements in {path}: unreadable ({e}); delete it, or run without it") from None
    differ = differences({k: v for k, v in context.items() if k not in ignore},
                         {k: v for k, v in made_in.items() if k not in ignore})
    if differ:
        shown = ", ".join(differ[:6]) + (f" and {len(differ) - 6} more" if len(differ) > 6 else "")
        raise UserError(f"cannot reuse the measurements in {path}: they were made with another {shown}; "
                        "reuse only runs of the same model and config, or give another out_dir")
    return entries


class Measurements:
    """Each measured plan's metrics and latency by plan key, written to ``path`` (atomically) after
    every new one, together with every reused one. With ``resume``, the measurements already at
    ``path`` are reused, and so are those of the ``sources`` files (other runs of the same table,
    e.g. one split over processes or machines), provided they were made in the same ``context``;
    otherwise that is a :class:`UserError`. Resuming processes may share ``path`` (a benchmark's
    cache): each write keeps what the others wrote there meanwhile in the same context."""

    def __init__(self, path: str, context: dict, resume: bool, sources: tuple[str, ...] = ()):
        self.path, self.context, self.entries, self.saved, self.resumed = path, context, {}, {}, 0
        self.resume = resume
        if resume and not os.path.exists(path):
            print(f"resume: no {path} yet, so " + ("every plan is measured" if not sources else
                                                    f"only plans in {', '.join(sources)} are reused"))
        elif resume:
            self.saved.update(read_measurements(path, context))
        for source in sources:
            if not os.path.isfile(source):
                raise UserError(f"cannot reuse measurements from {source}: no such file; give the measurements.json "
                                "of a run of the same model and config")
            self.saved.update(read_measurements(source, context))

    def __contains__(self, key: str) -> bool:
        return key in self.entries or key in self.saved

    def get(self, key: str) -> dict | None:
        if key not in self.entries and key in self.saved:
            self.entries[key] = self.saved[key]
            self.resumed += 1
        return self.entries.get(key)

    def put(self, key: str, measurement: dict) -> dict:
        self.entries[key] = json.loads(json.dumps(measurement))
        self.save()
        return self.entries[key]

    def save(self) -> None:
        with locked_directory(os.path.dirname(os.path.abspath(self.path))):
            meanwhile = {}
            if self.resume:
                try:
                    with open(self.path) as f:
                        saved = json.load(f)
                    meanwhile = saved["entries"] if saved["context"] == self.context else {}
                except (OSError, ValueError, KeyError, TypeError):
                    pass
            write_json_atomic(self.path, {"context": self.context, "entries": {**meanwhile, **self.saved, **self.entries}})


class _Evaluated:
    """The unpruned model's metrics and its timed call, for side-by-side latency."""

    def __init__(self, metrics: dict, call):
        self.metrics, self.call = metrics, call


class _ClassifierEval:
    def __init__(self, config, coco: str, model):
        self.config = config
        if config.image_folder:
            self.paths, self.labels, _ = image_folder(os.path.join(config.image_folder, "val"), model.meta["categories"])
            self.calib_paths, self.calib_labels, _ = image_folder(os.path.join(config.image_folder, "train"),
                                                                  model.meta["categories"])
            self.metric, self.description = "top1", "top-1 accuracy on the labelled validation images"
        else:
            self.paths = self.calib_paths = list_images(os.path.join(coco, "val2017"))
            self.labels = self.calib_labels = None
            self.metric = "top1_agreement"
            self.description = "top-1 agreement with the unpruned model (fidelity; no labels are used)"
        if config.eval_images:
            self.paths = self.paths[: config.eval_images]
            self.labels = None if self.labels is None else self.labels[: config.eval_images]
        self.reference = None

    @staticmethod
    def model_images(config, coco: str) -> list[str]:
        """Images to calibrate the BN statistics of random weights on."""
        return list_images(os.path.join(coco, "val2017"))[: config.eval_images or None]

    def calibration(self, seed: int):
        index = draw(list(range(len(self.calib_paths))), self.config.calib_images, seed)
        return [self.calib_paths[i] for i in index], None if self.calib_labels is None else self.calib_labels[index]

    def training_set(self, model):
        """What recovery trains on: the labelled ``train/`` folder (never the evaluation images)."""
        from xprune_jax.training.data import labelled_folder

        if not self.config.image_folder:
            raise UserError("recovery of a classifier needs labelled training images: set config.image_folder")
        return labelled_folder(model, os.path.join(self.config.image_folder, "train"))

    def metrics(self, model) -> dict:
        predicted = predict.classify(model, self.paths, self.config.batch_size, progress=False).argmax(-1)
        if self.reference is None:
            self.reference = predicted
        metrics = {"top1_agreement": float(np.mean(predicted == self.reference))}
        if self.labels is not None:
            metrics["top1"] = float(np.mean(predicted == self.labels))
        return metrics

    def __call__(self, model, timed_against: _Evaluated | None = None):
        metrics = self.metrics(model)
        size = model.meta["preprocess"]["crop"]
        x = np.random.default_rng(0).standard_normal((self.config.bench.batch_size, size, size, 3), np.float32)
        return _timed(model, jax.jit(model.module.apply), x, metrics, timed_against, self.config)


class _DetectionEval:
    def __init__(self, config, coco: str, model):
        from xprune_jax.evaluation.coco import evaluation_images, pipeline_for

        self.config, self.coco = config, coco
        image_dir, self.ground_truth, self.entries = evaluation_images(coco, config.eval_images)
        self.paths = [os.path.join(image_dir, e["file_name"]) for e in self.entries]
        self.sizes = [(e["height"], e["width"]) for e in self.entries]
        self.metric, self.description = "AP", "pycocotools AP (IoU 0.50:0.95) against the COCO ground truth"
        # Timed end to end: one preprocessed batch of real images in, final detections out. Pruning
        # changes no preprocessing, so every variant gets this same batch.
        pipeline = pipeline_for(model)
        plan = pipeline.plan(self.sizes, config.bench.batch_size)[0]
        self.bench_batch = parallel.pad_batch(np.stack([
            pipeline.preprocess(np.asarray(load_rgb(self.paths[i])), plan.input_shape)[0] for i in plan.indices]),
            config.bench.batch_size)

    @staticmethod
    def model_images(config, coco: str) -> list[str]:
        return []

    def calibration(self, seed: int):
        """Calibration images of ``config.calib_split``, with its annotation file for the ``loss`` objective
        (the default objective where the split has annotations)."""
        split = self.config.calib_split
        annotations = os.path.join(self.coco, "annotations", f"instances_{split}.json")
        paths = calibration_images(self.coco, self.config.calib_images, seed, split)
        labelled = self.config.objective == "loss" or (not self.config.objective and os.path.isfile(annotations))
        return paths, annotations if labelled else None

    def training_set(self, model):
        """What recovery trains on: ``config.calib_split`` with its ground truth where the objective has a task
        term (never the evaluation images)."""
        from xprune_jax.training.data import coco_split
        from xprune_jax.training.objectives import parse_objective

        labelled = bool(parse_objective(self.config.recovery.finetune.objective).task)
        return coco_split(model, self.coco, self.config.calib_split, labelled=labelled)

    def metrics(self, model, forward=None) -> dict:
        from xprune_jax.evaluation.coco import coco_metrics, detect, pipeline_for

        forward = forward or jax.jit(pipeline_for(model).forward)
        ids = [e["id"] for e in self.entries]
        detections, _ = detect(model, self.paths, ids, self.sizes, self.config.batch_size, progress=False, forward=forward)
        return coco_metrics(self.ground_truth, detections, ids)

    def __call__(self, model, timed_against: _Evaluated | None = None):
        from xprune_jax.evaluation.coco import pipeline_for

        forward = jax.jit(pipeline_for(model).forward)
        return _timed(model, forward, self.bench_batch, self.metrics(model, forward), timed_against, self.config)


def _recovers(config) -> bool:
    return "recovery" in config and bool(config.recovery.recalibrate_bn or config.recovery.finetune.steps)


class Recovery:
    """What ``config.recovery`` asks of each pruned model, each stage evaluated as the pruned model is: BN
    statistics re-estimated on ``recalibrate_bn`` training images (weights frozen), then ``finetune.steps``
    of fine-tuning from the unpruned model (distillation and/or the task loss) on the training split. Both
    are seeded by ``config.seed``, so a plan met again recovers the same way. With ``checkpoints`` (a
    folder), each fine-tuning checkpoints into ``checkpoints/KEY`` and resumes from there after a stop;
    the folder goes once the model is measured."""

    def __init__(self, config, teacher, evaluator, checkpoints: str | None = None):
        self.config, self.teacher, self.evaluator = config.recovery, teacher, evaluator
        self.seed, self.batch_size, self.checkpoints = config.seed, config.batch_size, checkpoints
        self.data = evaluator.training_set(teacher)

    def finetune_config(self):
        from xprune_jax.training.loop import FinetuneConfig
        from xprune_jax.training.objectives import parse_objective

        f = self.config.finetune
        return FinetuneConfig(steps=f.steps, batch_size=f.batch_size, lr=f.lr, optimizer=f.optimizer,
                              weight_decay=f.weight_decay, objective=parse_objective(f.objective), seed=self.seed,
                              checkpoint_every=f.checkpoint_every)

    def __call__(self, pruned, key: str) -> dict:
        """The recovery stages of ``pruned``, whose measurement ``key`` names its checkpoints."""
        import time

        from xprune_jax.training.loop import finetune, remove_checkpoints
        from xprune_jax.training.recalibrate import recalibrate_bn

        stages, model = {}, pruned
        if self.config.recalibrate_bn:
            start = time.perf_counter()
            model = recalibrate_bn(model, draw(self.data.paths, self.config.recalibrate_bn, self.seed), self.batch_size,
                                   progress=False)
            stages["recalibrated"] = {"seconds": time.perf_counter() - start, "metrics": self.evaluator.metrics(model)}
        if self.config.finetune.steps:
            checkpoints = self.checkpoints and os.path.join(self.checkpoints, key)
            model, record = finetune(model, self.teacher, self.data, self.finetune_config(), checkpoints, nested=True)
            stages["finetuned"] = {"seconds": record["seconds"], "steps": record["steps"],
                                   "final_loss": record["final"]["loss"], "metrics": self.evaluator.metrics(model),
                                   **({"resumed_from": record["resumed_from"]} if record["resumed_from"] else {})}
            if checkpoints and parallel.is_main():
                remove_checkpoints(checkpoints)
        return stages


def _timed(model, forward, x, metrics: dict, timed_against: _Evaluated | None, config):
    """The unpruned model's :class:`_Evaluated`, or a pruned model's ``(metrics, latency summary)``
    timed side by side with it."""
    call = functools.partial(forward, jax.device_put(precision.cast(model.variables)), jax.device_put(precision.cast(x)))
    if timed_against is None:
        return _Evaluated(metrics, call)
    times = timing.time_side_by_side({"unpruned": timed_against.call, "pruned": call}, config.bench.repeats,
                                     config.bench.warmup, config.seed)
    return metrics, {**timing.summarize(times, "unpruned")["pruned"], "unpruned_ms": [t * 1e3 for t in times["unpruned"]]}


def _median(values) -> float | None:
    return float(np.median(values)) if values else None


def summarize(rows: list[dict], metric: str) -> list[dict]:
    """Per (mode, budget, criterion): the metric and ratios over seeds (mean, std, n), and per
    (mode, budget) which criteria are ``best``: every one whose mean, as printed, is the best printed."""
    cells = {}
    for r in rows:
        if "infeasible" not in r:
            cells.setdefault((r["mode"], r["budget"], r["criterion"]), []).append(r)
    summary = []
    for (mode, budget, criterion), group in cells.items():
        values = np.array([r["metrics"][metric] for r in group])
        summary.append({"mode": mode, "budget": budget, "criterion": criterion, "n": len(group),
                        "metric_mean": float(values.mean()), "metric_std": float(values.std(ddof=1)) if len(group) > 1 else 0.0,
                        "flops_ratio": float(np.mean([r["flops_ratio"] for r in group])),
                        "params_ratio": float(np.mean([r["params_ratio"] for r in group])),
                        "latency_ratio": float(np.median([r["latency_ratio"] for r in group])),
                        **_recovered(group, metric)})
    for mode, budget in {(s["mode"], s["budget"]) for s in summary}:
        group = [s for s in summary if (s["mode"], s["budget"]) == (mode, budget)]
        best = best_criteria(group, metric)
        for s in group:
            s["best"] = s["criterion"] in best
    return summary


RECOVERY_STAGES = ("recalibrated", "finetuned")


def _recovered(group: list[dict], metric: str) -> dict:
    """Per recovery stage the rows reached: the metric's mean, std and n over seeds, and the mean seconds."""
    out = {}
    for stage in RECOVERY_STAGES:
        done = [r["recovery"][stage] for r in group if stage in r.get("recovery", {})]
        if done:
            values = np.array([d["metrics"][metric] for d in done])
            out[stage] = {"metric_mean": float(values.mean()), "n": len(done),
                          "metric_std": float(values.std(ddof=1)) if len(done) > 1 else 0.0,
                          "seconds": float(np.mean([d["seconds"] for d in done]))}
    return out


def best_criteria(cells: list[dict], metric: str) -> list[str]:
    """The criteria of one mode and budget whose mean metric, as printed, equals the best printed
    (what the tables show as tied is tied), in the order given."""
    best = format_metric(metric, max(s["metric_mean"] for s in cells))
    return [s["criterion"] for s in cells if format_metric(metric, s["metric_mean"]) == best]


def format_metric(metric: str, value: float) -> str:
    return f"{value:.1%}" if metric.startswith("top1") else f"{value:.3f}"


def format_mean(metric: str, cell: dict) -> str:
    """A summary cell's mean metric, with ± the standard deviation over seeds only where there are
    several seeds and they differ as printed."""
    mean, spread = format_metric(metric, cell["metric_mean"]), format_metric(metric, cell["metric_std"])
    return mean if cell["n"] < 2 or spread == format_metric(metric, 0.0) else f"{mean} ± {spread}"


def _layers(scores: dict) -> list[dict]:
    """The scored layers, without the block entries (which overlap their layers)."""
    return [l for l in scores["layers"] if l["kind"] != "block"]


def layer_comparison(scores: dict) -> list[dict]:
    """How far the criteria agree over the scored layers (block entries left out: they overlap their layers)."""
    return compare({c: {l["name"]: l["scores"][c] for l in _layers(scores)} for c in scores["criteria"]})


def _ranks(values) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (the ranks Spearman's correlation compares)."""
    return stats.rankdata(values)


def _plot_scores(scores: dict, path: str) -> None:
    plt = runs.pyplot()
    layers = _layers(scores)
    fig, ax = plt.subplots(figsize=(11, 5))
    for criterion in scores["criteria"]:
        ranks = (_ranks([l["scores"][criterion] for l in layers]) - 1) / max(1, len(layers) - 1)
        ax.plot(ranks, ".-", ms=3, lw=0.6, label=criterion)
    step = -(-len(layers) // 100)  # at most 100 names, each readable
    ax.set_xticks(range(0, len(layers), step))
    ax.set_xticklabels([l["name"].removesuffix(".conv") for l in layers[::step]], rotation=90, fontsize=6)
    ax.set_xlim(-1, len(layers))
    ax.set_title(f"{scores['arch']}: each layer's score as a rank percentile (0 = least important; ties share a rank)",
                 loc="left", fontsize=10)
    ax.set_ylabel("rank percentile")
    ax.grid(axis="x", lw=0.3, alpha=0.5)
    ax.legend(fontsize=7, ncol=len(scores["criteria"]), loc="lower right", bbox_to_anchor=(1, 1), frameon=False,
              borderaxespad=0.2)
    fig.tight_layout()
    runs.save_figure(fig, path)


def _plot_ranks(scores: dict, comparison: list[dict], path: str) -> None:
    """The first criterion's layer ranks against the first L1 criterion's (else the last one's), with
    the correlations of exactly the layers plotted."""
    plt = runs.pyplot()
    criteria = scores["criteria"]
    other = next((c for c in criteria[1:] if c.startswith("l1")), criteria[-1])
    layers = _layers(scores)
    a = _ranks([l["scores"][criteria[0]] for l in layers])
    b = _ranks([l["scores"][other] for l in layers])
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.scatter(a, b, s=8)
    title = f"{criteria[0]} vs {other}, {len(layers)} layers (blocks left out)"
    row = next((r for r in comparison if {r["a"], r["b"]} == {criteria[0], other}), None)
    if row:
        title += f"\nSpearman {row['spearman']:+.2f}, Kendall {row['kendall']:+.2f}"
    ax.set(title=title, xlabel=f"rank by {criteria[0]} (ties share a rank)", ylabel=f"rank by {other}")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    runs.save_figure(fig, path)


def _plot_tradeoff(rows: list[dict], metric: str, path: str) -> None:
    plt = runs.pyplot()
    rows = [r for r in rows if "infeasible" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    markers = {mode: marker for mode, marker in zip((*MODES, "auto"), "xosD*") if any(r["mode"] == mode for r in rows)}
    criteria = sorted({r["criterion"] for r in rows})
    colors = dict(zip(criteria, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    for ax, key, label in ((axes[0], "latency_ratio", "measured latency / unpruned"), (axes[1], "flops_ratio", "FLOPs / unpruned")):
        for r in rows:
            ax.scatter(r[key], r["metrics"][metric], marker=markers[r["mode"]], color=colors[r["criterion"]], s=30, alpha=0.8)
        ax.set(xlabel=label)
        ax.axvline(1.0, color="grey", lw=0.6)
    axes[0].set_ylabel(metric)
    handles = [plt.Line2D([], [], marker=m, ls="", color="k", label=mode) for mode, m in markers.items()]
    handles += [plt.Line2D([], [], marker="o", ls="", color=colors[c], label=c) for c in criteria]
    axes[1].legend(handles=handles, fontsize=7, loc="lower right")
    fig.tight_layout()
    runs.save_figure(fig, path)


def _report(results: dict, config) -> str:
    metric = results["metric"]
    unpruned = results["unpruned"]
    fmt = functools.partial(format_metric, metric)
    lines = [f"# Pruning {results['arch']}: criteria x modes x budgets", "",
             f"Weights: {results['weights']}. Metric: {metric}, {results['metric_description']}. Unpruned: "
             f"{metric} {fmt(unpruned['metrics'][metric])}, latency {unpruned['latency_ms'] or float('nan'):.2f} ms "
             f"(batch {config.bench.batch_size}). Latency of each pruned model is measured side by side with the "
             f"unpruned one ({config.bench.repeats} rounds in random order after {config.bench.warmup} warm-up calls; "
             "median ratio [IQR]). Calibration seeds: "
             f"{', '.join(str(s) for s in config.seeds)} ({config.calib_images} images each). Config, environment and "
             "seeds: `config.json`, `environment.json`; scores: `scores/`.", "",
             "## Summary over seeds", "",
             f"Mean {metric} over calibration seeds (± standard deviation, where the seeds differ as printed); "
             "**bold** = the best criterion at that mode and budget (every one, where they tie as printed).", "",
             "| mode | budget | criterion | seeds | " + metric + " | FLOPs | params | latency |", "|---|---|---|---|---|---|---|---|"]
    for s in sorted(results["summary"], key=lambda s: (s["mode"], s["budget"], -s["metric_mean"])):
        value = format_mean(metric, s)
        lines.append(f"| {s['mode']} | {s['budget']} | {s['criterion']} | {s['n']} | "
                     f"{'**' + value + '**' if s['best'] else value} | {s['flops_ratio']:.3f} | {s['params_ratio']:.3f} | "
                     f"{s['latency_ratio']:.3f} |")
    lines += ["", "## Who wins", ""] + _verdicts(results["summary"], metric)
    if any(stage in s for s in results["summary"] for stage in RECOVERY_STAGES):
        lines += _recovery_report(results, config)
    lines += ["", "## Every run", "",
              f"| criterion | mode | budget | seed | units | {metric} | FLOPs | params | latency |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if "infeasible" in r:
            lines.append(f"| {r['criterion']} | {r['mode']} | {r['budget']} | {r['seed']} | - | infeasible: {r['infeasible']} | | | |")
            continue
        lines.append(f"| {r['criterion']} | {r['mode']} | {r['budget']} | {r['seed']} | {len(r['selected'])} | "
                     f"{fmt(r['metrics'][metric])} | {r['flops_ratio']:.3f} | {r['params_ratio']:.3f} | "
                     f"{r['latency_ratio']:.3f} [{r['latency_ratio_iqr'][0]:.3f}, {r['latency_ratio_iqr'][1]:.3f}] |")
    if results["comparison"]:
        lines += ["", f"Criteria agreement (first seed, over the {results['comparison'][0]['layers']} scored layers; "
                  "block aggregates left out):", "", "| a | b | Spearman | Kendall | bottom-k overlap |", "|---|---|---|---|---|"]
    for c in results["comparison"]:
        lines.append(f"| {c['a']} | {c['b']} | {c['spearman']:+.2f} | {c['kendall']:+.2f} | {c['bottom_k_overlap']:.0%} of {c['bottom_k']} |")
    lines += ["", "`zero` keeps the graph, so its latency ratio measures timing noise, not a speed-up.", "",
              "![layer scores](plots/layer_scores.png)", "", "![criteria ranks](plots/criteria_ranks.png)", "",
              "![trade-off](plots/tradeoff.png)", ""]
    return "\n".join(lines)


def _recovery_report(results: dict, config) -> list[str]:
    """The recovery table (each cell as cut, after BN recalibration and after fine-tuning, beside the
    unpruned metric) and, per mode and budget, which criterion wins before and after fine-tuning."""
    metric, summary = results["metric"], results["summary"]
    unpruned = results["unpruned"]["metrics"][metric]
    fmt = functools.partial(format_metric, metric)
    r, f = config.recovery, config.recovery.finetune
    reference = reference_metric(results["unpruned"], metric)
    alike = ("" if reference is None else
             f" The unpruned model recovered alike reaches {fmt(reference)} (the task loss trains it too); the column "
             "after the fraction compares with that.")
    lines = ["", "## After recovery", "",
             f"Unpruned {metric}: {fmt(unpruned)}. BN recalibration: {r.recalibrate_bn} training images, weights "
             f"frozen. Fine-tuning: {f.steps} steps of batch {f.batch_size}, {f.optimizer} at lr {f.lr:g}, objective "
             f"`{f.objective}`, teacher the unpruned model.{alike} **Bold** = the best criterion at that stage, mode and "
             "budget; the last columns are the fine-tuned metric as a fraction of the unpruned one and the mean wall "
             "time of recovery per model.", "",
             "| mode | budget | criterion | seeds | as cut | BN recalibrated | fine-tuned | of unpruned | "
             + ("of unpruned fine-tuned alike | " if reference is not None else "") + "seconds |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if reference is not None else "")]
    keys = sorted({(s["mode"], s["budget"]) for s in summary})
    best = {}
    for key in keys:
        group = [s for s in summary if (s["mode"], s["budget"]) == key]
        best[key] = {stage: set(best_criteria([{"criterion": s["criterion"], **s[stage]} for s in group if stage in s],
                                              metric)) if any(stage in s for s in group) else set()
                     for stage in RECOVERY_STAGES}
        best[key]["cut"] = {s["criterion"] for s in group if s["best"]}

    def cell(s, stage, key):
        part = s if stage == "cut" else s.get(stage)
        if part is None:
            return "-"
        text = format_mean(metric, {"n": part["n"], "metric_mean": part["metric_mean"], "metric_std": part["metric_std"]})
        return f"**{text}**" if s["criterion"] in best[key][stage] else text

    for s in sorted(summary, key=lambda s: (s["mode"], s["budget"], -s.get("finetuned", s)["metric_mean"])):
        key = (s["mode"], s["budget"])
        last = s.get("finetuned") or s.get("recalibrated")
        fraction = f"{last['metric_mean'] / unpruned:.1%}" if last and unpruned else "-"
        if reference is not None:
            fraction += f" | {last['metric_mean'] / reference:.1%}" if last and reference else " | -"
        seconds = sum(s[stage]["seconds"] for stage in RECOVERY_STAGES if stage in s)
        lines.append(f"| {s['mode']} | {s['budget']} | {s['criterion']} | {s['n']} | {cell(s, 'cut', key)} | "
                     f"{cell(s, 'recalibrated', key)} | {cell(s, 'finetuned', key)} | {fraction} | {seconds:.0f} |")
    lines += ["", "Does recovery change which criterion wins?", ""]
    for key in keys:
        after = "finetuned" if best[key]["finetuned"] else "recalibrated"
        before, now = sorted(best[key]["cut"]), sorted(best[key][after])
        same = set(before) & set(now)
        verdict = "the same" if set(before) == set(now) else "partly the same" if same else "a different one"
        lines.append(f"- `{key[0]}` at {key[1]}: best as cut {', '.join(f'`{c}`' for c in before)}; "
                     f"{'fine-tuned' if after == 'finetuned' else 'recalibrated'} {', '.join(f'`{c}`' for c in now)} "
                     f"({verdict}).")
    return lines


def _verdicts(summary: list[dict], metric: str) -> list[str]:
    """One plain sentence per mode and budget: the winners, and how the paper's attribution fared
    against the L1 baseline and the random control (equal as printed, or a gap within one standard
    deviation, is a tie)."""
    fmt = functools.partial(format_metric, metric)
    lines = []
    for mode, budget in sorted({(s["mode"], s["budget"]) for s in summary}):
        group = {s["criterion"]: s for s in summary if (s["mode"], s["budget"]) == (mode, budget)}
        best = best_criteria(sorted(group.values(), key=lambda s: s["criterion"]), metric)
        value = fmt(group[best[0]]["metric_mean"])
        text = (f"- `{mode}` at {budget}: best is `{best[0]}` ({value})." if len(best) == 1 else
                f"- `{mode}` at {budget}: best are {', '.join(f'`{c}`' for c in best)}, tied at {value}.")
        paper = group.get("grad_x_act")
        for rival in ("l1", "random"):
            if paper and rival in group:
                a, b = paper, group[rival]
                spread = max(a["metric_std"], b["metric_std"])
                tie = fmt(a["metric_mean"]) == fmt(b["metric_mean"]) or abs(a["metric_mean"] - b["metric_mean"]) <= spread
                verdict = "ties with" if tie else "beats" if a["metric_mean"] > b["metric_mean"] else "loses to"
                caveat = ", one seed: no spread to judge by" if min(a["n"], b["n"]) < 2 else ""
                text += f" The paper's `grad_x_act` {verdict} `{rival}` ({fmt(a['metric_mean'])} vs {fmt(b['metric_mean'])}{caveat})."
        lines.append(text)
    return lines
