"""A seeded synthetic detection dataset in COCO format: coloured shapes over real COCO backgrounds.

``make_dataset(out, coco, seed)`` writes, under ``out/``::

    train2017/%012d.jpg, val2017/%012d.jpg          images (JPEG quality 95), named by image id
    annotations/instances_{train,val}2017.json      the official COCO instances format
    classification/{train,val}/<class>/*.png         one square crop per annotated object (ImageFolder)
    dataset.json                                     parameters, counts, annotation sha256

so ``xprune eval --coco=out`` and pycocotools read it unchanged. Six classes differ only in form
(``CLASSES``, category ids 1..6 in that order); colour, size (the longer side is 12-45% of the
image), aspect ratio (0.6-1.6, an axis scale before the rotation: circles become ellipses, squares
rectangles) and rotation are random. Each image holds 1-5 objects drawn in order over a random crop
of a real COCO image, 0-6 unannotated distractors (thin lines and blobs under 4% of the image side)
before and after them, and Gaussian noise (sigma 3 on 0-255).

Occlusion: later objects and distractors cover earlier ones. An object is annotated only if at
least ``MIN_VISIBLE`` (40%) of its (anti-aliased) pixel mass stays visible. Its ``bbox`` is the box of
its *visible* pixels (those at least half covered by the visible object), ``area`` their count, and
``segmentation`` their mask (uncompressed RLE): boxes describe what can be seen, not the amodal extent.

Every draw comes from ``np.random.default_rng([seed, split_id, index])``, so an image depends only on
(seed, split, index) and not on the counts, and the output is byte-identical for a seed on one
machine (same NumPy and Pillow). Train image ids are 1..N; val ids start at ``VAL_ID_OFFSET + 1``.
Crops are cut from the image before JPEG encoding: the object's box enlarged by a random 10-30%
margin, made square on its longer side, and shifted (not cut) to lie inside the image so it stays
square; then resized to ``crop_size`` with Pillow's BILINEAR. Class folders are created for every
class, also when a tiny dataset has no object of one.
"""

import colorsys
import functools
import hashlib
import json
import os
import shutil
import tempfile
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from xprune_jax.data.images import list_images, load_rgb
from xprune_jax.errors import UserError
from xprune_jax.fileio import atomic_path, file_sha256

GENERATOR_VERSION = "shapes-1"
CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")
SPLITS = (("train", 0), ("val", 1))  # (name, split_id): the split_id seeds the per-image generators
VAL_ID_OFFSET = 1_000_000_000
MIN_VISIBLE = 0.4
SUPERSAMPLE = 4
NOISE_SIGMA = 3.0


# --- shapes (unit templates, y down) -----------------------------------------------------------


def _regular(n: int, radius: float = 1.0, phase: float = np.pi / 2) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(angles), -np.sin(angles)], 1) * radius


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return _regular(2 * points) * radii[:, None]


def _cross(half_width: float = 0.3) -> np.ndarray:
    a, b = half_width, 1.0
    return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a],
                     [-b, -a], [-a, -a]])


# class name -> (filled polygons, holes); every template spans about [-1, 1] on its longer axis
_TEMPLATES = {
    "circle": ([_regular(96)], []),
    "square": ([np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])], []),
    "triangle": ([_regular(3)], []),
    "star": ([_star()], []),
    "cross": ([_cross()], []),
    "ring": ([_regular(96)], [_regular(96, 0.55)]),
}
assert tuple(_TEMPLATES) == CLASSES


# --- drawing --------------------------------------------------------------------------------------


def _box_of(points: list[np.ndarray], pad: float, size: int) -> tuple[int, int, int, int] | None:
    pts = np.concatenate(points)
    x0, y0 = np.floor(pts.min(0) - pad).astype(int)
    x1, y1 = np.ceil(pts.max(0) + pad).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _coverage(box, draw) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] over ``box``: ``draw(ImageDraw, to_canvas)`` paints at
    ``SUPERSAMPLE``x on an L canvas, which is box-filtered down."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    canvas = Image.new("L", (w * SUPERSAMPLE, h * SUPERSAMPLE), 0)

    def to_canvas(points: np.ndarray) -> list[tuple[float, float]]:
        # image coordinates (pixel i spans [i, i+1]) -> canvas pixel centres
        return [tuple(p) for p in ((points - (x0, y0)) * SUPERSAMPLE - 0.5).tolist()]

    draw(ImageDraw.Draw(canvas), to_canvas)
    return np.asarray(canvas.resize((w, h), Image.BOX), np.float32) * np.float32(1 / 255)


def _composite(img: np.ndarray, box, alpha: np.ndarray, colour: np.ndarray) -> None:
    x0, y0, x1, y1 = box
    region = img[y0:y1, x0:x1]
    a = alpha[..., None]
    region += a * (colour - region)


class _Layer(NamedTuple):
    """Something drawn over the image: its box and coverage; ``obj`` is its object index (None = clutter)."""

    box: tuple[int, int, int, int]
    alpha: np.ndarray
    obj: int | None = None


def _draw_clutter(rng: np.random.Generator, img: np.ndarray, size: int) -> _Layer | None:
    colour = rng.uniform(0, 255, 3).astype(np.float32)
    if rng.random() < 0.5:  # a thin line
        start = rng.uniform(0, size, 2)
        angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.5) * size
        end = start + length * np.array([np.cos(angle), np.sin(angle)])
        width = rng.uniform(0.8, 2.5)
        box = _box_of([start[None], end[None]], width + 1, size)
        if box is None:
            return None
        alpha = _coverage(box, lambda d, c: d.line(c(np.stack([start, end])), fill=255,
                                                   width=max(1, round(width * SUPERSAMPLE))))
    else:  # a small irregular blob, diameter under 4% of the image side
        centre = rng.uniform(0, size, 2)
        radius = rng.uniform(0.006, 0.02) * size
        wobble = rng.uniform(0.7, 1.0, 12)
        points = centre + _regular(12, phase=rng.uniform(0, 2 * np.pi)) * (radius * wobble)[:, None]
        box = _box_of([points], 1, size)
        if box is None:
            return None
        alpha = _coverage(box, lambda d, c: d.polygon(c(points), fill=255))
    _composite(img, box, alpha, colour)
    return _Layer(box, alpha)


def _object_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A saturated HSV colour: the one of four candidates farthest from the mean background under it."""
    candidates = np.array([colorsys.hsv_to_rgb(h, s, v) for h, s, v in
                           zip(rng.random(4), rng.uniform(0.65, 1.0, 4), rng.uniform(0.55, 1.0, 4))]) * 255
    distance = np.linalg.norm(candidates - background, axis=1)
    return candidates[int(np.argmax(distance))].astype(np.float32)


def _draw_object(rng: np.random.Generator, img: np.ndarray, size: int, index: int) -> tuple[int, _Layer]:
    category = int(rng.integers(len(CLASSES)))
    side = rng.uniform(0.12, 0.45) * size
    aspect = rng.uniform(0.6, 1.6)
    scale = np.array([side / 2, side / 2 / aspect]) if aspect >= 1 else np.array([side / 2 * aspect, side / 2])
    angle = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    fills, holes = _TEMPLATES[CLASSES[category]]
    fills, holes = [(p * scale) @ rotation.T for p in fills], [(p * scale) @ rotation.T for p in holes]
    pts = np.concatenate(fills)
    low, high = -pts.min(0) + 1, size - pts.max(0) - 1  # keep the whole object inside the image
    centre = rng.uniform(low, np.maximum(high, low))
    fills, holes = [p + centre for p in fills], [p + centre for p in holes]
    outline = rng.random() < 0.5
    outline_width = max(1, round(size / 256)) * SUPERSAMPLE
    box = _box_of(fills, 1, size)
    x0, y0, x1, y1 = box
    colour = _object_colour(rng, img[y0:y1, x0:x1].reshape(-1, 3).mean(0))

    def paint(d, c):
        for p in fills:
            d.polygon(c(p), fill=255)
        for p in holes:
            d.polygon(c(p), fill=0)

    alpha = _coverage(box, paint)
    colours = np.broadcast_to(colour, alpha.shape + (3,))
    if outline:
        def edges(d, c):
            for p in fills + holes:
                xy = c(p)
                d.line(xy + xy[:1], fill=255, width=outline_width, joint="curve")

        edge = np.minimum(_coverage(box, edges), alpha)[..., None]
        colours = colours + edge * (0.45 * colour - colours)
    _composite(img, box, alpha, colours)
    return category, _Layer(box, alpha, index)


def _background(rng: np.random.Generator, files: list[str], size: int) -> np.ndarray:
    src = _load_background(files[int(rng.integers(len(files)))])
    w, h = src.size
    side = min(w, h) * rng.uniform(0.35, 1.0)
    x, y = rng.uniform(0, w - side), rng.uniform(0, h - side)
    crop = src.resize((size, size), Image.BILINEAR, box=(x, y, x + side, y + side))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(crop, np.float32).copy()


@functools.lru_cache(maxsize=256)  # decoded once per run (about 1 MB each); cleared when a run ends
def _load_background(path: str) -> Image.Image:
    return load_rgb(path)


def _rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major mask, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"size": list(mask.shape), "counts": ([0] + counts) if flat[0] else counts}


def render_image(seed: int, split_id: int, index: int, backgrounds: list[str], size: int) -> tuple[np.ndarray, list[dict]]:
    """One image (uint8 HWC, before JPEG) and its annotated objects: dicts with ``category_id``,
    ``bbox`` [x, y, w, h] of the visible pixels, ``area`` and ``mask`` (bool, full image)."""
    rng = np.random.default_rng([seed, split_id, index])
    img = _background(rng, backgrounds, size)
    clutter = int(rng.integers(0, 7))
    before = int(rng.integers(0, clutter + 1))
    layers, categories = [], []
    for _ in range(before):
        layers.append(_draw_clutter(rng, img, size))
    for i in range(int(rng.integers(1, 6))):
        category, layer = _draw_object(rng, img, size, i)
        categories.append(category)
        layers.append(layer)
    for _ in range(clutter - before):
        layers.append(_draw_clutter(rng, img, size))
    noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(NOISE_SIGMA)
    pixels = np.clip(np.rint(img + noise), 0, 255).astype(np.uint8)

    # What stays visible of each object: its coverage times what every later layer leaves uncovered.
    uncovered = np.ones((size, size), np.float32)
    objects = [None] * len(categories)
    for layer in reversed([layer for layer in layers if layer is not None]):
        x0, y0, x1, y1 = layer.box
        if layer.obj is not None:
            visible = layer.alpha * uncovered[y0:y1, x0:x1]
            total = float(layer.alpha.sum())
            if total > 0 and float(visible.sum()) >= MIN_VISIBLE * total:
                shown = visible >= 0.5
                ys, xs = np.nonzero(shown)
                if len(xs):
                    mask = np.zeros((size, size), bool)
                    mask[y0:y1, x0:x1] = shown
                    bbox = [float(x0 + xs.min()), float(y0 + ys.min()), float(xs.max() - xs.min() + 1),
                            float(ys.max() - ys.min() + 1)]
                    objects[layer.obj] = {"category_id": categories[layer.obj] + 1, "bbox": bbox,
                                          "area": float(len(xs)), "mask": mask}
        uncovered[y0:y1, x0:x1] *= 1 - layer.alpha
    return pixels, [o for o in objects if o is not None]


def _crop(rng: np.random.Generator, image: Image.Image, bbox: list[float], crop_size: int) -> Image.Image:
    x, y, w, h = bbox
    size = image.width
    side = min(float(size), max(w, h) * (1 + rng.uniform(0.1, 0.3)))
    left = min(max(x + w / 2 - side / 2, 0.0), size - side)
    top = min(max(y + h / 2 - side / 2, 0.0), size - side)
    return image.resize((crop_size, crop_size), Image.BILINEAR, box=(left, top, left + side, top + side))


def _image_id(split_id: int, index: int) -> int:
    return index + 1 + (VAL_ID_OFFSET if split_id else 0)


def _write_image(root: str, split: str, split_id: int, index: int, seed: int, backgrounds: list[str], size: int,
                 crop_size: int) -> tuple[dict, list[dict]]:
    """Render, write the JPEG and the crops of one image; return its COCO ``image`` and ``annotations``."""
    pixels, objects = render_image(seed, split_id, index, backgrounds, size)
    image_id = _image_id(split_id, index)
    name = f"{image_id:012d}.jpg"
    image = Image.fromarray(pixels)
    image.save(os.path.join(root, f"{split}2017", name), quality=95)
    crop_rng = np.random.default_rng([seed, split_id, index, 1])  # margins: independent of the image draws
    annotations = []
    for j, obj in enumerate(objects):
        ann_id = image_id * 100 + j + 1
        crop = _crop(crop_rng, image, obj["bbox"], crop_size)
        crop.save(os.path.join(root, "classification", split, CLASSES[obj["category_id"] - 1], f"{ann_id:014d}.png"))
        annotations.append({"id": ann_id, "image_id": image_id, "category_id": obj["category_id"],
                            "bbox": obj["bbox"], "area": obj["area"], "iscrowd": 0,
                            "segmentation": _rle(obj["mask"])})
    return {"id": image_id, "file_name": name, "height": size, "width": size}, annotations


# --- the dataset ---------------------------------------------------------------------------------


def _backgrounds(coco: str) -> list[str]:
    folder = os.path.join(coco, "val2017")
    if not os.path.isdir(folder):
        raise UserError(f"COCO folder {coco} has no val2017/: point --coco at a folder of real COCO images "
                        "laid out like the official download (e.g. ../shared/coco_val2017_subset)")
    try:
        return list_images(folder)
    except UserError:
        raise UserError(f"no images in {folder}: point --coco at a COCO root whose val2017/ holds images") from None


def _digest(files: list[str]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{os.path.basename(path)}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _write_json(path: str, data, **kwargs) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, **kwargs)
        f.write("\n")


def make_dataset(out: str, coco: str, seed: int = 0, train_images: int = 2000, val_images: int = 200,
                 image_size: int = 256, crop_size: int = 64, progress: bool = True) -> dict:
    """Write the dataset (see the module docstring) to ``out`` and return its ``dataset.json``.

    ``coco``: a folder whose ``val2017/`` holds the real images that backgrounds are cropped from.
    If ``out`` already holds a dataset made with the same parameters (and the same backgrounds), it
    is returned as it is; any other existing ``out`` is an error. Everything is written into
    ``out.partial-XXXX`` first and renamed into place at the end, so a crash never leaves a
    half-made dataset at ``out``. ``progress``: show a progress bar (images, rate, time left).
    """
    for name, value, low in (("seed", seed, 0), ("train_images", train_images, 0), ("val_images", val_images, 0),
                             ("image_size", image_size, 32), ("crop_size", crop_size, 8)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise UserError(f"--{name}={value} is invalid: use an integer >= {low}")
    if train_images >= VAL_ID_OFFSET:
        raise UserError(f"--train_images={train_images} is too large: use fewer than {VAL_ID_OFFSET}")
    backgrounds = _backgrounds(coco)
    parameters = {"generator_version": GENERATOR_VERSION, "seed": int(seed), "train_images": int(train_images),
                  "val_images": int(val_images), "image_size": int(image_size), "crop_size": int(crop_size),
                  "classes": list(CLASSES), "backgrounds": {"count": len(backgrounds), "sha256": _digest(backgrounds)}}
    out = os.path.abspath(out)
    if os.path.exists(out):
        return _existing(out, parameters)

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    root = tempfile.mkdtemp(prefix=f"{os.path.basename(out)}.partial-", dir=parent)
    try:
        os.chmod(root, 0o755)  # mkdtemp makes it private; the dataset is not
        summary = _generate(root, parameters, backgrounds, progress)
        try:
            os.rename(root, out)
        except OSError as e:
            raise UserError(f"cannot move the finished dataset to {out} ({e.strerror}): it appeared meanwhile; "
                            "remove it or choose another --out") from None
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return summary


def _existing(out: str, parameters: dict) -> dict:
    fix = "remove it or choose another --out"
    try:
        with open(os.path.join(out, "dataset.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        raise UserError(f"{out} exists and is not a dataset written by `xprune synth`: {fix}") from None
    if summary.get("parameters") != parameters:
        old = summary.get("parameters") or {}
        changed = sorted(k for k in set(old) | set(parameters) if old.get(k) != parameters.get(k))
        raise UserError(f"{out} holds a synthetic dataset with other parameters ({', '.join(changed)}): {fix}")
    return summary


def _generate(root: str, parameters: dict, backgrounds: list[str], progress: bool) -> dict:
    import tqdm

    size, crop_size, seed = parameters["image_size"], parameters["crop_size"], parameters["seed"]
    for split, _ in SPLITS:
        os.makedirs(os.path.join(root, f"{split}2017"))
        for name in CLASSES:
            os.makedirs(os.path.join(root, "classification", split, name))
    results = {split: ([], []) for split, _ in SPLITS}
    total = parameters["train_images"] + parameters["val_images"]
    try:
        with tqdm.tqdm(total=total, unit="img", desc="synth", disable=not progress) as bar:
            for split, split_id in SPLITS:
                for index in range(parameters[f"{split}_images"]):
                    image, annotations = _write_image(root, split, split_id, index, seed, backgrounds, size, crop_size)
                    results[split][0].append(image)
                    results[split][1].extend(annotations)
                    bar.update()
    finally:
        _load_background.cache_clear()

    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    splits = {}
    for split, _ in SPLITS:
        images, annotations = results[split]
        path = os.path.join(root, "annotations", f"instances_{split}2017.json")
        _write_json(path, {"info": {"description": "xprune_jax synthetic shapes on COCO backgrounds",
                                    "version": GENERATOR_VERSION},
                           "licenses": [], "images": images, "annotations": annotations, "categories": categories})
        per_class = {name: 0 for name in CLASSES}
        for a in annotations:
            per_class[CLASSES[a["category_id"] - 1]] += 1
        crops = {name: len(os.listdir(os.path.join(root, "classification", split, name))) for name in CLASSES}
        splits[split] = {"images": len(images), "objects": len(annotations), "objects_per_class": per_class,
                         "crops_per_class": crops, "annotations": os.path.relpath(path, root),
                         "annotations_sha256": file_sha256(path)}
    summary = {"parameters": parameters, "splits": splits}
    _write_json(os.path.join(root, "dataset.json"), summary, indent=1)
    return summary

