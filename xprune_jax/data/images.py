"""Image folders, decoding, and torchvision's classification eval transform (PIL + NumPy)."""

import concurrent.futures
import os
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from xprune_jax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise UserError(f"image folder {folder} does not exist: point --images at a folder of images")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}: point --images at a folder of images")
    return files


def image_folder(root: str, classes: Sequence[str] | None = None) -> tuple[list[str], np.ndarray, list[str]]:
    """A labelled image set in torchvision's ImageFolder layout (``root/<class name>/*.png``):
    ``(paths, labels, class names)``. With ``classes`` (a model's categories), labels index them."""
    if not os.path.isdir(root):
        raise UserError(f"labelled image folder {root} does not exist: give a folder laid out as <class name>/<image>")
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not found:
        raise UserError(f"{root} has no class subfolders: give a folder laid out as <class name>/<image> (ImageFolder)")
    classes = list(classes) if classes is not None else found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f"{root} has classes {unknown} that the model does not know ({', '.join(classes)}); "
                        "evaluate it with the model trained on these classes")
    paths, labels = [], []
    for name in found:
        files = sorted(os.path.join(root, name, f) for f in os.listdir(os.path.join(root, name))
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        paths += files
        labels += [classes.index(name)] * len(files)
    if not paths:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {root}")
    return paths, np.asarray(labels, np.int32), classes


def load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as e:  # PIL raises many types, and Ultralytics patches Image.open with its own fallbacks
        raise UserError(f"cannot read image {path} ({e.__class__.__name__}: {e}); remove or replace the file") from None


_INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def classification_transform(img: Image.Image, resize: int, crop: int, mean: Sequence[float], std: Sequence[float],
                             interpolation: str = "bilinear", position: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
    """torchvision's ``ImageClassification`` eval transform on a PIL image, as HWC float32.

    Resize the short side to ``resize`` (long side floored), center-crop ``crop``, scale to [0, 1],
    normalise. ``position`` (fractions of the margins, top and left) moves the crop (training jitter).
    """
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize * long / short)
    new_w, new_h = (resize, new_long) if w <= h else (new_long, resize)
    img = img.resize((new_w, new_h), _INTERPOLATION[interpolation])
    top, left = int(round((new_h - crop) * position[0])), int(round((new_w - crop) * position[1]))
    img = img.crop((left, top, left + crop, top + crop))
    x = np.asarray(img, dtype=np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def prefetch(items: Sequence, load: Callable, batch_size: int, workers: int = 2) -> Iterator[tuple[list, list]]:
    """Yield ``(items, loaded)`` in batches, decoding ahead in threads so that decoding overlaps
    device work."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = [pool.submit(load, item) for item in items[: 2 * batch_size]]
        submitted = len(pending)
        for start in range(0, len(items), batch_size):
            chunk = items[start: start + batch_size]
            loaded = [pending.pop(0).result() for _ in chunk]
            for item in items[submitted: submitted + len(chunk)]:
                pending.append(pool.submit(load, item))
            submitted = min(len(items), submitted + len(chunk))
            yield list(chunk), loaded
