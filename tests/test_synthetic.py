"""The synthetic shapes dataset: seeded and byte-identical, valid COCO, consistent crops and counts, clear errors."""

import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from xprune_jax.data import synthetic
from xprune_jax.data.synthetic import CLASSES, VAL_ID_OFFSET, make_dataset
from xprune_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]


def files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def coco(path: pathlib.Path):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


@pytest.fixture(scope="module")
def sample(tmp_path_factory, coco_root):
    """A larger sample (30 train images) for the content checks."""
    out = tmp_path_factory.mktemp("synth") / "shapes"
    return out, make_dataset(str(out), str(coco_root), seed=3, train_images=30, val_images=6, image_size=128,
                             crop_size=32, progress=False)


def test_same_seed_same_bytes_other_seed_other_images(tmp_path, coco_root):
    kwargs = dict(coco=str(coco_root), train_images=6, val_images=4, image_size=96, crop_size=24, progress=False)
    make_dataset(str(tmp_path / "a"), seed=7, **kwargs)
    make_dataset(str(tmp_path / "b"), seed=7, **kwargs)
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 20
    assert [name for name in a if a[name] != b[name]] == []
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]

    make_dataset(str(tmp_path / "c"), seed=8, **kwargs)
    c = files(tmp_path / "c")
    jpgs = [name for name in a if name.endswith(".jpg")]
    assert len(jpgs) == 10 and all(c[name] != a[name] for name in jpgs)

    # An image depends on (seed, split, index) only, not on how many images the dataset has.
    make_dataset(str(tmp_path / "d"), seed=7, **{**kwargs, "train_images": 3, "val_images": 1})
    d = files(tmp_path / "d")
    assert all(d[name] == a[name] for name in d if name.endswith((".jpg", ".png")))
    assert sum(name.endswith(".jpg") for name in d) == 4


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' mask decoding under NumPy 2
def test_coco_annotations_crops_and_counts(sample):
    out, summary = sample
    stored = json.loads((out / "dataset.json").read_text())
    assert stored == summary and stored["parameters"]["classes"] == list(CLASSES)
    assert stored["parameters"]["generator_version"] == synthetic.GENERATOR_VERSION
    image_ids = {}
    for split, n in (("train", 30), ("val", 6)):
        path = out / "annotations" / f"instances_{split}2017.json"
        gt = coco(path)
        counts = stored["splits"][split]
        assert counts["annotations_sha256"] == synthetic.file_sha256(str(path))
        assert [c["id"] for c in gt.dataset["categories"]] == [1, 2, 3, 4, 5, 6]
        assert [c["name"] for c in gt.dataset["categories"]] == list(CLASSES)
        images = gt.dataset["images"]
        assert counts["images"] == len(images) == n == len(os.listdir(out / f"{split}2017"))
        image_ids[split] = {e["id"] for e in images}
        for entry in images:
            assert (entry["height"], entry["width"]) == (128, 128) and entry["file_name"] == f"{entry['id']:012d}.jpg"
            with Image.open(out / f"{split}2017" / entry["file_name"]) as img:
                assert img.size == (128, 128) and img.mode == "RGB" and img.format == "JPEG"
        anns = gt.dataset["annotations"]
        assert counts["objects"] == len(anns) >= n and len({a["id"] for a in anns}) == len(anns)
        per_class = {name: 0 for name in CLASSES}
        for a in anns:
            x, y, w, h = a["bbox"]
            assert a["iscrowd"] == 0 and w > 0 and h > 0 and a["area"] > 0
            assert x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128
            assert a["area"] <= w * h
            mask = gt.annToMask(a)  # the visible pixels; the box is theirs
            ys, xs = np.nonzero(mask)
            assert mask.sum() == a["area"] and [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == a["bbox"]
            per_class[CLASSES[a["category_id"] - 1]] += 1
        assert counts["objects_per_class"] == per_class
        crops = {name: sorted(os.listdir(out / "classification" / split / name)) for name in CLASSES}
        assert sorted(os.listdir(out / "classification" / split)) == sorted(CLASSES)
        assert counts["crops_per_class"] == {name: len(c) for name, c in crops.items()} == per_class
        for name, crop_files in crops.items():
            for f in crop_files[:3]:
                with Image.open(out / "classification" / split / name / f) as img:
                    assert img.size == (32, 32) and img.mode == "RGB"
    assert all(per_class_count > 0 for per_class_count in stored["splits"]["train"]["objects_per_class"].values())
    assert max(image_ids["train"]) < VAL_ID_OFFSET < min(image_ids["val"])


def test_existing_dataset_is_kept_and_anything_else_refused(sample, coco_root, tmp_path):
    out, summary = sample
    mtime = (out / "dataset.json").stat().st_mtime_ns
    kwargs = dict(seed=3, train_images=30, val_images=6, image_size=128, crop_size=32, progress=False)
    assert make_dataset(str(out), str(coco_root), **kwargs) == summary
    assert (out / "dataset.json").stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match="other parameters \\(seed\\): remove it or choose another --out"):
        make_dataset(str(out), str(coco_root), **{**kwargs, "seed": 4})
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="is not a dataset written by `xprune synth`: remove it"):
        make_dataset(str(tmp_path / "taken"), str(coco_root), **kwargs)


def test_missing_or_empty_coco_folder(tmp_path):
    with pytest.raises(UserError, match="has no val2017/"):
        make_dataset(str(tmp_path / "out"), str(tmp_path / "nope"), progress=False)
    (tmp_path / "empty" / "val2017").mkdir(parents=True)
    with pytest.raises(UserError, match="no images in"):
        make_dataset(str(tmp_path / "out"), str(tmp_path / "empty"), progress=False)
    with pytest.raises(UserError, match="--image_size=8 is invalid"):
        make_dataset(str(tmp_path / "out"), str(tmp_path / "empty"), image_size=8, progress=False)
    assert os.listdir(tmp_path) == ["empty"]


def test_a_crash_leaves_nothing_at_out(tmp_path, coco_root, monkeypatch):
    calls = []

    def crash(*args):
        calls.append(args)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return write(*args)

    write = synthetic._write_image
    monkeypatch.setattr(synthetic, "_write_image", crash)
    with pytest.raises(RuntimeError, match="boom"):
        make_dataset(str(tmp_path / "out"), str(coco_root), train_images=4, val_images=1, image_size=64, progress=False)
    assert os.listdir(tmp_path) == []


def test_cli_synth(tmp_path, coco_root):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "xprune_jax", "synth", "--cache_dir=", f"--out={tmp_path / 'shapes'}"]
    result = subprocess.run(command + [f"--coco={coco_root}", "--train_images=2", "--val_images=1", "--image_size=64",
                                       "--crop_size=16"], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote" in result.stdout and "val 1 images" in result.stdout
    assert json.loads((tmp_path / "shapes" / "dataset.json").read_text())["parameters"]["crop_size"] == 16
    result = subprocess.run(command + ["--coco=/nonexistent"], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "has no val2017/" in result.stderr
