"""Jitted, batched detection over image folders and COCO evaluation with pycocotools, for every
detector (through its :class:`xprune_jax.detection.DetectionPipeline`).

Decoding and preprocessing run in threads ahead of the device. Each finished batch is appended to
``detections.partial.jsonl``, so a crashed run resumes without redoing finished images (only a run of
the same model and settings: the file's first line records them); the final files are written
atomically.
"""

import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import time

import jax
import numpy as np
import tqdm

from xprune_jax import models, parallel, precision
from xprune_jax.checkpoint import Model, model_fingerprint, write_json_atomic
from xprune_jax.data.images import list_images, load_rgb
from xprune_jax.errors import UserError
from xprune_jax.fileio import atomic_path, differences, exclusive, read_json

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


def coco_paths(root: str) -> tuple[str, str]:
    images, annotations = os.path.join(root, "val2017"), os.path.join(root, "annotations", "instances_val2017.json")
    for path in (images, annotations):
        if not os.path.exists(path):
            raise UserError(f"COCO root {root} has no {os.path.relpath(path, root)}: point --coco at a folder laid out "
                            "like the official download (val2017/, annotations/instances_val2017.json)")
    return images, annotations


def load_ground_truth(annotation_file: str):
    """pycocotools' COCO index of a COCO instances json, checked first for the fields evaluation reads."""
    from pycocotools.coco import COCO

    dataset = read_json(annotation_file, "COCO annotations", "use the official instances_val2017.json layout")
    problem = _annotation_problem(dataset)
    if problem:
        raise UserError(f"COCO annotations {annotation_file} {problem}; use the official instances_val2017.json layout")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


ANNOTATION_FIELDS = {"images": ("id", "file_name", "height", "width"), "categories": ("id", "name"),
                     "annotations": ("image_id", "category_id", "bbox", "area")}


def _annotation_problem(dataset) -> str | None:
    """What keeps ``dataset`` from being a COCO instances file that evaluation can use, or None."""
    if not isinstance(dataset, dict):
        return f"hold a {type(dataset).__name__}, not an object with images, annotations and categories"
    for section, fields in ANNOTATION_FIELDS.items():
        entries = dataset.get(section)
        if not isinstance(entries, list):
            return f"have no {section!r} list"
        for i, entry in enumerate(entries):
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                return f"lack {', '.join(repr(f) for f in missing)} in {section}[{i}]"
            if section == "images" and not all(isinstance(entry[f], int) and entry[f] > 0 for f in ("height", "width")):
                return f"give images[{i}] a height or width that is not a positive integer"
            if section == "annotations" and not (isinstance(entry["bbox"], list) and len(entry["bbox"]) == 4
                                                 and all(isinstance(v, (int, float)) for v in entry["bbox"])):
                return f"give annotations[{i}] a bbox that is not [x, y, w, h]"
    return None


def pipeline_for(model: Model, predict: bool = False):
    """The detector's evaluation pipeline, or with ``predict`` its single-image prediction pipeline."""
    architecture = models.get_architecture(model.arch)
    if architecture.pipeline is None:
        raise UserError(f"{model.arch} is a {architecture.task} model; this command needs a detector")
    make = architecture.predict_pipeline if predict and architecture.predict_pipeline else architecture.pipeline
    return make(model)


def image_id_from_name(path: str) -> int | None:
    """COCO-style file names (``000000000139.jpg``) carry the image id as their integer stem."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return int(stem) if stem.isdigit() else None


def detect(model: Model, paths: list[str], image_ids: list, sizes: list[tuple[int, int]], batch_size: int,
           partial_file: str | None = None, progress: bool = True, forward=None,
           predict: bool = False) -> tuple[list[dict], dict]:
    """COCO result entries for ``paths`` and a latency record, through the evaluation pipeline or, with
    ``predict``, the prediction one, at the current :mod:`~xprune_jax.precision`. ``sizes`` are
    original (h, w); ``forward`` is a ``jax.jit`` of the pipeline's forward to reuse (one is made otherwise).

    Every process of a multi-process run passes every image's path, id and size and gets every entry
    back; each reads and preprocesses only its own rows of each batch (:func:`parallel.local_rows`) and
    logs only its own images to its own ``partial_file``. A batch is skipped only when every process
    has its images logged."""
    pipeline = pipeline_for(model, predict)
    mesh = parallel.data_mesh()
    parallel.check_batch_size(batch_size, mesh)
    rows = parallel.local_rows(batch_size, mesh)
    progress = progress and parallel.is_main()
    forward = forward or jax.jit(pipeline.forward)
    variables = parallel.replicate(precision.cast(model.variables), mesh)
    plans = pipeline.plan(sizes, batch_size)
    shares = [[plan.indices[k] for k in rows if k < len(plan.indices)] for plan in plans]  # this process's images
    logged = _read_partial(partial_file)
    done = {i: logged[image_ids[i]] for share in shares for i in share if image_ids[i] in logged}
    finished = parallel.all_processes([all(i in done for i in share) for share in shares])
    todo = [k for k, finished_k in enumerate(finished) if not finished_k]

    def prepare(k):
        plan, share = plans[k], shares[k]
        # a process without images in a short last batch still sends rows of the right shape (zeros)
        loaded = [pipeline.preprocess(np.asarray(load_rgb(paths[i])), plan.input_shape) for i in share or plan.indices[:1]]
        arrays = np.stack([array for array, _ in loaded])[: len(share)]
        return precision.cast(parallel.pad_batch(arrays, len(rows))), [meta for _, meta in loaded]

    latencies, shapes_seen, compile_seconds = [], set(), 0.0
    start = time.perf_counter()
    remaining = sum(len(plans[k].indices) for k in todo)
    with concurrent.futures.ThreadPoolExecutor(2) as pool, \
            tqdm.tqdm(total=remaining, unit="img", desc="detect", disable=not progress) as bar, \
            (open(partial_file, "a") if partial_file else contextlib.nullcontext()) as log:
        futures = [pool.submit(prepare, k) for k in todo[:2]]
        for n, k in enumerate(todo):
            plan = plans[k]
            batch, metas = futures[n].result()
            if n + 2 < len(todo):
                futures.append(pool.submit(prepare, todo[n + 2]))
            tick = time.perf_counter()
            out = forward(variables, parallel.global_batch(batch, batch_size, mesh))
            out = {key: parallel.host_rows(out[key], rows) for key in ("boxes", "scores", "labels", "valid")}
            seconds = time.perf_counter() - tick
            if plan.input_shape not in shapes_seen:  # the first call of a shape compiles
                shapes_seen.add(plan.input_shape)
                compile_seconds += seconds
            else:
                latencies += [seconds / len(plan.indices)] * len(plan.indices)
            for j, i in enumerate(shares[k]):
                done[i] = _entries(pipeline, out, j, metas[j], image_ids[i], os.path.basename(paths[i]))
                if log:
                    log.write(json.dumps({"image_id": image_ids[i], "detections": done[i]}) + "\n")
            if log:
                log.flush()
            bar.update(len(plan.indices))
    elapsed = time.perf_counter() - start
    ordered = _gathered(done, paths, image_ids)
    record = {"images": len(paths), "images_this_run": remaining, "batch_size": batch_size,
              "devices": mesh.size, "processes": jax.process_count(),
              "compiled_shapes": len(shapes_seen), "first_call_seconds": compile_seconds,
              "per_image_seconds_median": float(np.median(latencies)) if latencies else None,
              "per_image_seconds_p90": float(np.percentile(latencies, 90)) if latencies else None,
              "per_image_seconds": latencies, "images_per_second": remaining / elapsed if elapsed else None,
              "backend": jax.default_backend(), "precision": precision.current()}
    return ordered, record


def _gathered(done: dict[int, list[dict]], paths: list[str], image_ids: list) -> list[dict]:
    """Every process's entries (``done``: image index -> its entries), in image order, on every process.
    They travel as float64 rows (index, category, x, y, w, h, score): the rounded values arrive exact."""
    table = np.asarray([[i, e["category_id"], *e["bbox"], e["score"]] for i, entries in done.items() for e in entries],
                       np.float64).reshape(-1, 7)
    by_image: dict[int, list] = {}
    for row in parallel.gather(table):
        by_image.setdefault(int(row[0]), []).append(row)
    return [{"image_id": image_ids[i], "file_name": os.path.basename(paths[i]), "category_id": int(row[1]),
             "bbox": [float(v) for v in row[2:6]], "score": float(row[6])}
            for i in range(len(paths)) for row in by_image.get(i, [])]


def _entries(pipeline, out: dict, j: int, meta, image_id, file_name: str) -> list[dict]:
    valid = np.asarray(out["valid"][j], bool)
    boxes = pipeline.to_original(np.asarray(out["boxes"][j])[valid], meta)
    entries = []
    for (x1, y1, x2, y2), score, label in zip(boxes, np.asarray(out["scores"][j])[valid], np.asarray(out["labels"][j])[valid]):
        entries.append({"image_id": image_id, "file_name": file_name, "category_id": int(label),
                        "bbox": [round(float(x1), 3), round(float(y1), 3), round(float(x2 - x1), 3), round(float(y2 - y1), 3)],
                        "score": round(float(score), 5)})
    return entries


def _read_partial(path: str | None) -> dict:
    done = {}
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by a crash: that image is redone
                    continue
                if "image_id" in record:  # the first line records what made the file
                    done[record["image_id"]] = record["detections"]
    return done


def coco_metrics(ground_truth, detections: list[dict], image_ids: list[int]) -> dict:
    """pycocotools bbox metrics restricted to ``image_ids``."""
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return {name: 0.0 for name in METRIC_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        results = ground_truth.loadRes([{k: d[k] for k in ("image_id", "category_id", "bbox", "score")} for d in detections])
        evaluator = COCOeval(ground_truth, results, "bbox")
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(METRIC_NAMES, evaluator.stats)}


def evaluation_images(coco_root: str, max_images: int = 0) -> tuple[str, object, list[dict]]:
    """``(image dir, ground truth, image entries)`` of a COCO root's val2017 that exist on disk, in
    file-name order (Ultralytics'), the first ``max_images`` (0 = all)."""
    image_dir, annotation_file = coco_paths(coco_root)
    ground_truth = load_ground_truth(annotation_file)
    entries = sorted(ground_truth.dataset["images"], key=lambda e: e["file_name"])
    entries = [e for e in entries if os.path.exists(os.path.join(image_dir, e["file_name"]))]
    entries = entries[: max_images or None]
    if not entries:
        raise UserError(f"no annotated image of {annotation_file} is in {image_dir}: check the COCO root")
    return image_dir, ground_truth, entries


def evaluate(model: Model, coco_root: str, out_dir: str, batch_size: int = 8, max_images: int = 0,
             progress: bool = True, overwrite: bool = False) -> dict:
    """``xprune eval``: detections.json, metrics.json and latency.json in ``out_dir``; returns the metrics
    (None on the other processes of a multi-process run: process 0 alone runs pycocotools and writes).

    Finished batches go to ``detections.partial.jsonl`` (``detections.partial.process<N>of<P>.jsonl``,
    one per process, in a multi-process run), whose first line records what made them
    (:func:`evaluation_record`); a later run resumes from it only if that matches, and starts over
    with ``overwrite``. One run at a time writes ``out_dir`` (a lock file in it).
    """
    image_dir, ground_truth, entries = evaluation_images(coco_root, max_images)
    check_categories(model, ground_truth, coco_paths(coco_root)[1])
    parallel.check_batch_size(batch_size, parallel.data_mesh())
    made_by = evaluation_record(model, entries, batch_size, max_images)
    os.makedirs(out_dir, exist_ok=True)
    processes = jax.process_count()
    suffix = f".process{jax.process_index()}of{processes}" if processes > 1 else ""  # each process resumes its own
    with exclusive(out_dir, f".xprune{suffix if jax.process_index() else ''}.lock"):  # process 0 holds the run's lock
        partial = os.path.join(out_dir, f"detections.partial{suffix}.jsonl")
        _start_partial(partial, made_by, overwrite)
        detections, latency = detect(model, [os.path.join(image_dir, e["file_name"]) for e in entries],
                                     [e["id"] for e in entries], [(e["height"], e["width"]) for e in entries],
                                     batch_size, partial, progress)
        metrics = None
        if parallel.is_main():
            metrics = coco_metrics(ground_truth, detections, [e["id"] for e in entries])
            metrics.update({"images": len(entries), "detections": len(detections), "arch": model.arch,
                            "made_by": made_by, "precision": made_by["precision"]})
            write_json_atomic(os.path.join(out_dir, "detections.json"), detections)
            write_json_atomic(os.path.join(out_dir, "metrics.json"), metrics)
            write_json_atomic(os.path.join(out_dir, "latency.json"), latency)
        os.remove(partial)
    return metrics


def evaluation_record(model: Model, entries: list[dict], batch_size: int, max_images: int) -> dict:
    """What an evaluation's detections depend on: the model's content, the images and the batch size
    (Ultralytics' rectangular batches depend on it) and the precision."""
    images = json.dumps([[e["id"], e["file_name"], e["height"], e["width"]] for e in entries]).encode()
    return {"model_fingerprint": model_fingerprint(model), "arch": model.arch,
            "images_sha256": hashlib.sha256(images).hexdigest(), "images": len(entries), "max_images": max_images,
            "batch_size": batch_size,
            "precision": precision.current()}


def _start_partial(path: str, made_by: dict, overwrite: bool) -> None:
    """Keep the partial file of the same evaluation; refuse another's (or drop it with ``overwrite``)."""
    if os.path.exists(path) and not overwrite:
        try:
            with open(path) as f:
                recorded = json.loads(f.readline()).get("made_by")
        except (ValueError, AttributeError):
            recorded = None
        if recorded == made_by:
            return
        differ = ("an unrecorded model and settings" if not isinstance(recorded, dict) else
                  "another " + ", ".join(differences(made_by, recorded)))
        raise UserError(f"{path} holds detections made with {differ}; choose another --out, or pass --overwrite "
                        "to start over")
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(json.dumps({"made_by": made_by}) + "\n")


def check_categories(model: Model, ground_truth, annotation_file: str) -> None:
    """Refuse to evaluate a detector against annotations whose category ids name other classes."""
    names = model.meta.get("categories") or []
    model_names = {}
    for category_id, index in pipeline_for(model).class_indices.items():
        name = str(names[index]).strip().lower() if index < len(names) else ""
        if name and name not in ("n/a", "__background__", str(index)):  # placeholders name nothing
            model_names[category_id] = name
    data_names = {c["id"]: str(c["name"]).strip().lower() for c in ground_truth.dataset["categories"]}
    if not model_names:
        return  # the model records no class names: nothing to check against
    shared = sorted(set(model_names) & set(data_names))
    wrong = [i for i in shared if model_names[i] != data_names[i]]
    if wrong or not shared:
        example = (f"category id {wrong[0]} is {model_names[wrong[0]]!r} to the model but {data_names[wrong[0]]!r} in "
                   "the annotations" if wrong else "they share no category id")
        raise UserError(f"the model's categories are not those of {annotation_file} ({example}); "
                        "evaluate on data labelled with the model's classes")


def predict_folder(model: Model, folder: str, batch_size: int = 8, annotation_file: str | None = None,
                   progress: bool = True) -> list[dict]:
    """``xprune predict`` for detectors: COCO result entries for every image of ``folder``, each as the
    detector's own single-image predict gives it (whatever the other images, ``batch_size`` and the
    number of devices and processes); every process of a multi-process run gets them all."""
    paths = list_images(folder)
    ids_by_name = {}
    if annotation_file:
        ids_by_name = {e["file_name"]: e["id"] for e in load_ground_truth(annotation_file).dataset["images"]}
    image_ids = [ids_by_name.get(os.path.basename(p), image_id_from_name(p)) for p in paths]
    detections, _ = detect(model, paths, image_ids, image_sizes(paths), batch_size, None, progress, predict=True)
    return detections


def image_sizes(paths: list[str]) -> list[tuple[int, int]]:
    """Each image's (h, w); each process of a multi-process run reads every P-th image, and all learn all."""
    mine = range(jax.process_index(), len(paths), jax.process_count())
    table = parallel.gather(np.asarray([[i, *load_rgb(paths[i]).size[::-1]] for i in mine], np.int64).reshape(-1, 3))
    sizes = {int(i): (int(h), int(w)) for i, h, w in table}
    return [sizes[i] for i in range(len(paths))]
