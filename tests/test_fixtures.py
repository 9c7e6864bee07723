"""The trained classifier fixtures (benchmarks/fixtures/*_shapes.pth) reach their recorded accuracy.

The val split is regenerated in a tmp folder from the parameters in each card (``train_images=0``:
every image depends only on (seed, split, index), so the val crops are the ones the fixture was
scored on); the fixture goes through ``xprune convert`` and ``predict.classify``.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

FIXTURES = REPO / "benchmarks" / "fixtures"
COMMITTED = ["mobilenet_v2", "shufflenet_v2_x1_0"]
MIN_TOP1 = 0.9


def _card(arch: str) -> dict:
    with open(FIXTURES / f"{arch}_shapes.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def val_split(tmp_path_factory, coco_root):
    """The val crops of the fixtures' dataset, regenerated; all fixtures must share one dataset."""
    from xprune_jax.data.synthetic import make_dataset

    parameters = {json.dumps(_card(arch)["dataset"]["parameters"], sort_keys=True) for arch in COMMITTED}
    assert len(parameters) == 1, "the committed fixtures were trained on different datasets"
    p = json.loads(parameters.pop())
    out = tmp_path_factory.mktemp("shapes") / "shapes"
    summary = make_dataset(str(out), str(coco_root), seed=p["seed"], train_images=0, val_images=p["val_images"],
                           image_size=p["image_size"], crop_size=p["crop_size"], progress=False)
    made = summary["parameters"]
    assert {**made, "train_images": p["train_images"]} == p, "the generator or the backgrounds changed"
    card = _card(COMMITTED[0])
    assert summary["splits"]["val"]["annotations_sha256"] == card["dataset"]["annotations_sha256"]["val"]
    return out / "classification" / "val"


def _convert(arch: str, out) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "xprune_jax", "convert", f"--arch={arch}",
                             f"--weights={FIXTURES / f'{arch}_shapes.pth'}", f"--out={out}",
                             f"--cache_dir={REPO / '.cache' / 'jax'}"], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("arch", COMMITTED)
def test_fixture_reaches_recorded_top1(arch, val_split, tmp_path):
    from xprune_jax.checkpoint import load_model
    from xprune_jax.data.images import image_folder
    from xprune_jax.predict import classify

    card = _card(arch)
    assert os.path.getsize(FIXTURES / f"{arch}_shapes.pth") < 10e6
    _convert(arch, tmp_path / "model")
    model = load_model(str(tmp_path / "model"))
    assert model.meta["categories"] == card["categories"] == sorted(card["dataset"]["parameters"]["classes"])
    assert model.meta["preprocess"] == card["preprocess"]
    assert model.spec.num_classes == len(card["categories"])

    paths, labels, _ = image_folder(str(val_split), model.meta["categories"])
    assert len(paths) == card["metrics"]["val_images"]
    logits = classify(model, paths, batch_size=64, progress=False)
    top1 = float(np.mean(logits.argmax(1) == labels))
    assert abs(top1 - card["metrics"]["val_top1"]) <= 0.01, (top1, card["metrics"])
    assert top1 >= MIN_TOP1


def test_train_detector_epochs_default_per_arch():
    """The one-line fixture command trains each detector for its own default length; --epochs overrides it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_detector", FIXTURES / "train_detector.py")
    train_detector = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_detector)
    defaults = {arch: train_detector.parse_args([f"--arch={arch}", "--out=x.pth"]).epochs
                for arch in train_detector.ARCHS}
    assert defaults == {"fasterrcnn_resnet50_fpn": 1.8, "retinanet_resnet50_fpn": 3.0}
    assert train_detector.parse_args(["--arch=fasterrcnn_resnet50_fpn", "--out=x.pth", "--epochs=2.5"]).epochs == 2.5
