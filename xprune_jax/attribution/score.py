"""``xprune score``: score every layer of a model with one or more criteria on calibration images."""

import functools
import os

import jax
import numpy as np
import tqdm

from xprune_jax import analysis, models, parallel, precision, runs
from xprune_jax.attribution.compare import compare
from xprune_jax.attribution.criteria import CRITERIA, ScoringInputs, get_criterion
from xprune_jax.attribution.objectives import LOSS_ARCHS, get_objective
from xprune_jax.attribution.statistics import loss_step, statistics_step
from xprune_jax.checkpoint import Model, model_fingerprint
from xprune_jax.data.images import classification_transform, list_images, load_rgb, prefetch
from xprune_jax.errors import UserError


def calibration_images(coco_root: str, n: int, seed: int, split: str = "train2017") -> list[str]:
    """``n`` images of ``coco_root/<split>`` drawn with ``seed`` (a different seed, other images)."""
    folder = os.path.join(coco_root, split)
    if not os.path.isdir(coco_root):
        raise UserError(f"COCO root {coco_root} does not exist: point --coco at a folder laid out like the official download")
    if not os.path.isdir(folder):
        raise UserError(f"COCO root {coco_root} has no {split}/ to calibrate on: set --calib_split (config.calib_split) "
                        "to a split it has (val2017 overlaps the images that evaluation measures)")
    return draw(list_images(folder), n, seed)


def draw(items: list, n: int, seed: int) -> list[int]:
    """``n`` of ``items`` drawn without replacement with ``seed``, in their original order."""
    if n > len(items):
        raise UserError(f"{n} calibration images asked for, but only {len(items)} are available; ask for at most {len(items)}")
    picks = np.random.default_rng(seed).choice(len(items), size=n, replace=False)
    return [items[i] for i in sorted(picks)]


def calibration_loader(model: Model):
    """path -> network input of ``analysis.input_size(model)`` squared, as the model's own preprocessing makes it
    (a detector pipeline that resizes to a size range, like torchvision's, pads to its ``square_side``)."""
    if models.get_architecture(model.arch).task == "classification":
        return functools.partial(_load_classification, preprocess=model.meta["preprocess"])
    from xprune_jax.evaluation.coco import pipeline_for

    pipeline = pipeline_for(model)
    side = _detection_side(model, pipeline)
    return lambda path: pipeline.preprocess(np.asarray(load_rgb(path)), (side, side))[0]


def _detection_side(model: Model, pipeline) -> int:
    return getattr(pipeline, "square_side", None) or analysis.input_size(model)


def gather_statistics(model: Model, paths: list[str], objective, batch_size: int, progress: bool = True,
                      ground_truth=None, seed: int = 0, weight_gradients: bool = False):
    """Summed gradient x activation statistics over ``paths`` (one jitted pass per batch); with
    ``weight_gradients``, ``(statistics, dL/dparams summed over the images)``.

    ``ground_truth``: classifiers' class indices (else -1: the model's own top-1), or for detectors
    a COCO annotation file holding the images, whose boxes go to the objective (``loss``). A loss that
    samples (Faster R-CNN's) samples image ``i`` of ``paths`` with the raw key ``(seed, i)``.

    Every process of a multi-process run passes the same ``paths`` (the global calibration draw) and
    loads only its rows of each batch; the jitted step sums over every device of every process, so
    each process gets the same totals, equal to one device's up to the order of float32 sums.
    """
    mesh = parallel.data_mesh()
    step = statistics_step(model.module, objective, weight_gradients, mesh)
    variables = parallel.replicate(precision.cast(model.variables), mesh)
    total = None
    for batch in _calibration_batches(model, paths, objective, batch_size, ground_truth, seed, mesh, progress, "score"):
        stats = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), step(variables, batch))
        total = stats if total is None else jax.tree_util.tree_map(np.add, total, stats)
    return total


def calibration_loss(model: Model, paths: list[str], objective, batch_size: int = 8, ground_truth=None,
                     seed: int = 0) -> float:
    """The mean over ``paths`` of each image's ``objective`` (a forward pass, BatchNorm on its running
    statistics), batched as :func:`gather_statistics` batches."""
    mesh = parallel.data_mesh()
    step = loss_step(model.module, objective, mesh)
    variables = parallel.replicate(precision.cast(model.variables), mesh)
    total = sum(float(step(variables, batch))
                for batch in _calibration_batches(model, paths, objective, batch_size, ground_truth, seed, mesh, False, "loss"))
    return total / len(paths)


def selection_loss(model: Model, objective: str, calibration: tuple[list[str], object], batch_size: int = 8,
                   seed: int = 0):
    """``pruned -> its calibration_loss`` on ``calibration = (paths, ground truth)`` under the objective
    ``model`` was scored with: what ``--mode=auto`` minimises. A classifier without labels is measured
    against the unpruned model's top-1 (its own would reward any change); a detector needs its
    training loss, which needs ground truth."""
    task = models.get_architecture(model.arch).task
    paths, ground_truth = calibration
    if task == "detection" and (objective != "loss" or ground_truth is None):
        raise UserError(f"--mode=auto chooses by the calibration images' training loss, which needs their ground truth; "
                        f"these scores used the {objective or 'confidence'} objective: score with --objective=loss on a "
                        f"COCO split with annotations, or choose --mode=shrink")
    get_objective(objective, task, model.arch, model.spec)  # a clear error for an unknown name, before any work
    if task == "classification" and ground_truth is None:
        from xprune_jax import predict

        ground_truth = predict.classify(model, paths, batch_size, progress=False).argmax(-1)

    def loss(pruned: Model) -> float:
        _, fn = get_objective(objective, task, pruned.arch, pruned.spec)  # a torchvision loss is the spec's own
        return calibration_loss(pruned, paths, fn, batch_size, ground_truth, seed)

    return loss


def _calibration_batches(model: Model, paths: list[str], objective, batch_size: int, ground_truth, seed: int, mesh,
                         progress: bool, desc: str):
    """Each batch of ``paths`` as the jitted steps take it: this process's rows loaded, padding rows
    (zeros, weight 0) to ``batch_size``, laid out over ``mesh``."""
    parallel.check_batch_size(batch_size, mesh)
    rows = parallel.local_rows(batch_size, mesh)
    load = _example_loader(model, paths, ground_truth)
    if getattr(objective, "model_targets", False):  # the model computes the loss: targets go with the images
        load = functools.partial(_with_targets, load, seed)
    shares = parallel.local_items(list(range(len(paths))), batch_size, mesh)  # this process's images of each batch
    chunks = prefetch([i for share in shares for i in share], load, len(rows))
    blank = None
    with tqdm.tqdm(total=len(paths), unit="img", desc=desc, disable=not (progress and parallel.is_main())) as bar:
        for start, share in zip(range(0, len(paths), batch_size), shares):
            examples = next(chunks)[1] if share else []
            if blank is None:  # padding rows: zeros shaped like an example, weight 0
                blank = jax.tree_util.tree_map(np.zeros_like, examples[0] if examples else load(0))
            batch = jax.tree_util.tree_map(lambda *x: np.stack(x), *examples, *[blank] * (len(rows) - len(examples)))
            batch["images"] = precision.cast(batch["images"])  # the ground truth stays float32
            batch["weights"] = (np.arange(len(rows)) < len(examples)).astype(np.float32)
            yield parallel.global_batch(batch, batch_size, mesh)
            bar.update(min(batch_size, len(paths) - start))


def _with_targets(load, seed: int, i: int) -> dict:
    """The example with its ground truth and sampling key as the model's own input (``model_targets``)."""
    example = load(i)
    targets = {key: example.pop(key) for key in ("gt_boxes", "gt_classes", "gt_mask")}
    return {**example, "model_targets": {**targets, "keys": np.array([seed, i], np.uint32)}}


def _example_loader(model: Model, paths: list[str], ground_truth):
    """index -> the objective's inputs for one calibration image."""
    image = calibration_loader(model)
    if models.get_architecture(model.arch).task == "classification":
        labels = np.full(len(paths), -1, np.int32) if ground_truth is None else np.asarray(ground_truth, np.int32)
        return lambda i: {"images": image(paths[i]), "labels": labels[i]}
    if ground_truth is None:
        return lambda i: {"images": image(paths[i])}
    from xprune_jax.evaluation.coco import pipeline_for

    pipeline = pipeline_for(model)
    targets = detection_targets(annotation_file=ground_truth, paths=paths, class_indices=pipeline.class_indices)
    max_boxes = max(8, -(-max(len(t[0]) for t in targets) // 8) * 8)  # one padded size per run: one compilation
    side = _detection_side(model, pipeline)

    def load(i):
        array, meta = pipeline.preprocess(np.asarray(load_rgb(paths[i])), (side, side))
        boxes, classes = targets[i]
        xyxy = pipeline.to_input(np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1), meta)
        n = len(boxes)
        return {"images": array, "gt_boxes": np.pad(xyxy, ((0, max_boxes - n), (0, 0))),
                "gt_classes": np.pad(classes, (0, max_boxes - n)), "gt_mask": np.arange(max_boxes) < n}

    return load


def detection_targets(annotation_file: str, paths: list[str],
                      class_indices: dict[int, int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image: its non-crowd COCO boxes (xywh, original pixels) and class indices (the model's):
    ``class_indices`` maps category ids to them (the pipeline's ``class_indices``)."""
    from xprune_jax.evaluation.coco import load_ground_truth

    if not os.path.isfile(annotation_file):
        raise UserError(f"the loss objective needs ground truth, but {annotation_file} does not exist; "
                        "give a COCO root with annotations for the calibration split, or use --objective=confidence")
    coco = load_ground_truth(annotation_file)
    ids = {e["file_name"]: e["id"] for e in coco.dataset["images"]}
    targets = []
    for path in paths:
        name = os.path.basename(path)
        if name not in ids:
            raise UserError(f"calibration image {name} has no entry in {annotation_file}; calibrate on annotated images")
        annotations = [a for a in coco.imgToAnns[ids[name]] if not a.get("iscrowd")]
        unknown = {a["category_id"] for a in annotations} - set(class_indices)
        if unknown:
            raise UserError(f"{annotation_file} uses category ids {sorted(unknown)} that this model does not "
                            "predict; calibrate on data with the model's classes")
        targets.append((np.asarray([a["bbox"] for a in annotations], np.float32).reshape(-1, 4),
                        np.asarray([class_indices[a["category_id"]] for a in annotations], np.int32)))
    return targets


def draw_calibration(coco_root: str, calib_images: int, seed: int, calib_split: str, objective: str):
    """``(paths, ground truth)`` as :func:`score_model` draws them from a COCO root: ``calib_images`` of
    ``calib_split`` with ``seed``, and its annotation file where the objective is ``loss``."""
    if not coco_root:
        raise UserError("data-driven criteria need calibration images: pass --coco=ROOT")
    paths = calibration_images(coco_root, calib_images, seed, calib_split)
    return paths, os.path.join(coco_root, "annotations", f"instances_{calib_split}.json") if objective == "loss" else None


def _load_classification(path, preprocess):
    return classification_transform(load_rgb(path), **preprocess)


def score_model(model: Model, criteria: list[str], objective: str = "", coco_root: str = "", calib_images: int = 32,
                batch_size: int = 8, seed: int = 0, progress: bool = True, all_channel_scores: bool = False,
                calibration: tuple[list[str], object] | None = None, calib_split: str = "train2017") -> dict:
    """Scores of every layer under each criterion, with layer metadata, a comparison, and the model's
    fingerprint (:func:`~xprune_jax.checkpoint.model_fingerprint`: plans check it).

    Calibration images are ``calib_images`` of ``coco_root/<calib_split>`` drawn with ``seed`` (the
    ``loss`` objective reads ``annotations/instances_<calib_split>.json``), or the given
    ``calibration = (paths, ground truth or None)`` (see :func:`gather_statistics`). A detector whose
    loss is ported calibrates on that loss by default where the images have ground truth.

    ``channel_scores`` are the primary (first) criterion's; ``all_channel_scores`` adds every
    criterion's under ``channel_scores_by``.
    """
    task = models.get_architecture(model.arch).task
    chosen = [get_criterion(name) for name in criteria]
    if not chosen:
        raise UserError(f"no --criterion given; choose from {', '.join(sorted(CRITERIA))}")
    if not objective and task == "detection" and model.arch.startswith(LOSS_ARCHS):
        # annotated calibration images: the training loss picks better channels than the label-free confidence
        annotations = os.path.join(coco_root, "annotations", f"instances_{calib_split}.json") if coco_root else ""
        labelled = calibration[1] is not None if calibration else os.path.isfile(annotations)
        objective = "loss" if labelled else ""
    objective_name, objective_fn = get_objective(objective, task, model.arch, model.spec)
    layers = analysis.describe_layers(model.arch, model.spec, analysis.input_size(model))
    inputs = ScoringInputs(layers, model.variables["params"], seed=seed)
    paths, ground_truth = [], None
    if any(c.needs_data for c in chosen):
        paths, ground_truth = calibration or draw_calibration(coco_root, calib_images, seed, calib_split, objective_name)
        if objective_name == "loss" and ground_truth is None:
            raise UserError("the loss objective needs the calibration images' ground truth; give a COCO root with annotations")
        weight_gradients = any(c.needs_weight_gradients for c in chosen)
        statistics = gather_statistics(model, paths, objective_fn, batch_size, progress, ground_truth, seed, weight_gradients)
        inputs.statistics, inputs.weight_gradients = statistics if weight_gradients else (statistics, None)
        inputs.n_images = len(paths)
    results = {c.full_name: c(inputs) for c in chosen}
    primary = chosen[0].full_name
    return {
        "criterion": primary, "criteria": list(results), "objective": objective_name, "arch": model.arch,
        "model_fingerprint": model_fingerprint(model),
        "precision": precision.current(),
        "calibration": {"images": [os.path.basename(p) for p in paths], "seed": seed, "batch_size": batch_size,
                        "split": calib_split if paths and calibration is None else None,
                        "ground_truth": ground_truth if isinstance(ground_truth, str) else ground_truth is not None},
        "layers": [{
            "name": layer.name, "kind": layer.kind, "shape": list(layer.shape), "params": layer.params,
            "flops": layer.flops, "score": results[primary][layer.name].score,
            "scores": {c: results[c][layer.name].score for c in results},
            "channel_scores": _listed(results[primary][layer.name].channel_scores),
            "input_channel_scores": _listed(results[primary][layer.name].input_channel_scores),
            **({"channel_scores_by": {c: _listed(results[c][layer.name].channel_scores) for c in results},
                "input_channel_scores_by": {c: _listed(results[c][layer.name].input_channel_scores) for c in results}}
               if all_channel_scores else {}),
        } for layer in layers],
        "comparison": compare({c: {n: s.score for n, s in r.items() if s.score is not None} for c, r in results.items()}),
        "environment": runs.environment(),
    }


def _listed(values):
    return None if values is None else [float(v) for v in values]
