"""Every bad input gets a one-line UserError that names the problem and the fix."""

import json
import os
import shutil
import urllib.error

import pytest
import torch
import torchvision

from converters import torchvision_io
from xprune_jax import models
from xprune_jax.checkpoint import Model, load_model, save_model
from xprune_jax.data.images import list_images, load_rgb
from xprune_jax.errors import UserError

ARCH = "shufflenet_v2_x0_5"  # the smallest backbone keeps these tests fast


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "shufflenet.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(ARCH, weights=None).state_dict(), path)
    return path


def _raises(match, fn, *args):
    with pytest.raises(UserError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_weights_file():
    _raises("does not exist: give an existing .pth file", torchvision_io.convert, ARCH, "/nonexistent/w.pth")


def test_corrupt_weights_file(weights_file, tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(weights_file.read_bytes()[:5000])
    _raises("not a readable torch checkpoint", torchvision_io.convert, ARCH, str(truncated))
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    _raises("cannot read weights file", torchvision_io.convert, ARCH, str(text))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    _raises("weights file .*empty.pth is empty; re-download it", torchvision_io.convert, ARCH, str(empty))
    card = tmp_path / "card.pth"
    card.write_text(json.dumps({"categories": ["a", "b"]}))
    _raises(r"not a readable torch checkpoint \(neither a zip archive nor a pickle: it starts with b'\{\"categories",
            torchvision_io.convert, ARCH, str(card))


class RunsCode:
    """Unpickling this creates ``path``: what a crafted weights file could do with any code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickled_module_or_object_is_refused_in_one_clean_line(tmp_path):
    """``torch.save(model)`` instead of its state_dict: one line without torch's ANSI-coloured advice."""
    path = tmp_path / "whole.pth"
    torch.save(torchvision.models.get_model(ARCH, weights=None), path)
    message = _raises(r"holds a pickled module \(torchvision.models.shufflenetv2.ShuffleNetV2\), not a state_dict: "
                      r"save one with torch.save\(model.state_dict\(\), path\) instead \(a pickled module is not "
                      "loaded because unpickling can run code", torchvision_io.convert, ARCH, str(path))
    assert "\x1b" not in message and "weights_only" not in message
    marker = tmp_path / "ran"
    torch.save({"conv1.0.weight": torch.zeros(1), "note": RunsCode(marker)}, path)
    _raises(r"holds pickled Python objects \(\w+.open\), not a state_dict", torchvision_io.convert, ARCH, str(path))
    assert not marker.exists()


def test_error_text_is_one_sentence_without_ansi_codes():
    from converters.safe_load import error_text

    error = RuntimeError("Weights only load failed. \x1b[1mdo those steps only if you trust it\x1b[0m.\n\t(1) more")
    assert error_text(error) == "Weights only load failed"
    assert error_text(RuntimeError("\x1b[31mbad\x1b[0m file\nsecond line")) == "bad file"
    assert error_text(EOFError()) == "EOFError"


def test_file_without_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    _raises("holds no state_dict of tensors", torchvision_io.convert, ARCH, str(path))


def test_architecture_mismatch_names_keys(weights_file):
    message = _raises("do not fit resnet18", torchvision_io.convert, "resnet18", str(weights_file))
    assert "100 missing keys: bn1.bias, bn1.weight, conv1.weight" in message
    assert "unexpected keys: conv1.0.weight" in message
    assert "fc.weight (file (1000, 1024), model (1000, 512))" in message


def test_mis_shaped_weights_are_named(tmp_path):
    torch.manual_seed(0)
    state_dict = torchvision.models.get_model("shufflenet_v2_x1_0", weights=None).state_dict()
    path = tmp_path / "wider.pth"
    torch.save(state_dict, path)
    message = _raises("mis-shaped keys", torchvision_io.convert, ARCH, str(path))
    assert "stage2.0.branch1.2.weight (file (58, 24, 1, 1), model (24, 24, 1, 1))" in message


def test_unknown_weights_name():
    _raises("unknown weights 'IMAGENET9K' for resnet50.*IMAGENET1K_V1", torchvision_io.convert, "resnet50", "IMAGENET9K")


def test_unknown_architecture():
    _raises("unknown architecture 'resnet5'; choose one of", models.get_architecture, "resnet5")


def test_weights_name_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dst, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    message = _raises("could not download .*place the official file at", torchvision_io.convert, ARCH, "DEFAULT")
    assert str(tmp_path / "hub" / "checkpoints" / "shufflenetv2_x0.5-f707e7126e.pth") in message


def test_model_dir_errors(weights_file, tmp_path):
    _raises("is not a model directory", load_model, str(tmp_path))
    model = torchvision_io.convert(ARCH, str(weights_file))
    save_model(model, str(tmp_path / "m"))
    _raises("already exists: choose another --out or pass --overwrite", save_model, model, str(tmp_path / "m"))
    save_model(model, str(tmp_path / "m"), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no staging directories left behind

    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "m", broken)
    (broken / "model.json").write_text("{not json")
    _raises("model.json is corrupt", load_model, str(broken))

    shutil.rmtree(broken / "variables")
    (broken / "model.json").write_text((tmp_path / "m" / "model.json").read_text())
    _raises("cannot read the variables", load_model, str(broken))

    wrong = Model(ARCH, models.get_architecture("shufflenet_v2_x1_0").default_spec(), model.variables, model.meta)
    save_model(wrong, str(tmp_path / "wrong"))
    _raises("variables do not match the spec", load_model, str(tmp_path / "wrong"))


@pytest.mark.parametrize("ultralytics_imported", [False, True])
def test_image_errors(tmp_path, ultralytics_imported):
    if ultralytics_imported:  # it patches PIL.Image.open, whose failures then raise other types
        import ultralytics.utils.patches  # noqa: F401

    _raises("does not exist: point --images", list_images, str(tmp_path / "none"))
    _raises("no images .* in", list_images, str(tmp_path))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    _raises("cannot read image .*bad.jpg.*remove or replace", load_rgb, str(bad))


def test_unreadable_json_inputs_name_the_file_and_how_to_make_one(tmp_path):
    from xprune_jax.evaluation.coco import load_ground_truth
    from xprune_jax.pruning.latency import read_layer_latency

    (tmp_path / "cut.json").write_text('{"layers": {')
    for path, reason in ((tmp_path / "cut.json", "JSONDecodeError"), (tmp_path / "absent.json", "FileNotFoundError"),
                         (tmp_path, "IsADirectoryError")):
        _raises(f"cannot read COCO annotations {path} \\({reason}\\); use the official instances_val2017.json layout",
                load_ground_truth, str(path))
        _raises(f"cannot read layer latency table {path} \\({reason}\\); make one with `xprune prune --latency_price=N`",
                read_layer_latency, str(path), None, 1)


def test_model_card_errors(weights_file, tmp_path):
    path = tmp_path / "w.pth"
    shutil.copy(weights_file, path)
    (tmp_path / "w.json").write_text("{not json")
    _raises("is not valid JSON", torchvision_io.convert, ARCH, str(path))
    (tmp_path / "w.json").write_text(json.dumps({"categories": ["a"], "colour": "red"}))
    _raises(r"unknown fields \['colour'\]", torchvision_io.convert, ARCH, str(path))


def test_labelled_image_folder_errors(tmp_path):
    from xprune_jax.data.images import image_folder

    _raises("does not exist", image_folder, str(tmp_path / "missing"))
    _raises("has no class subfolders", image_folder, str(tmp_path))
    (tmp_path / "zebra").mkdir()
    _raises(r"classes \['zebra'\] that the model does not know", image_folder, str(tmp_path), ["circle"])
    _raises("no images", image_folder, str(tmp_path), ["zebra"])


def test_objective_must_fit_the_model():
    from xprune_jax.attribution.objectives import get_objective

    _raises("ported for YOLOv8, RetinaNet and Faster R-CNN only", get_objective, "loss", "detection", "ssd300_vgg16")
    _raises("does not fit a classification model", get_objective, "confidence", "classification", ARCH)
    _raises("does not fit a detection model", get_objective, "cross_entropy", "detection", "yolov8n")
    assert get_objective("loss", "detection", "yolov8n")[0] == "loss"
