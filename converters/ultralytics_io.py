"""Resolve, read and convert Ultralytics YOLOv8 detection checkpoints to a Flax :class:`Model`.

Verified with Ultralytics 8.4.190 (torch 2.15): its ``DetectionModel`` built from ``yolov8{n,s,m,l,x}.yaml``
(the "legacy" Detect head: two 3x3 Convs per branch, DFL with reg_max 16, NMS), saved as the official
release files are (a pickled dict whose ``model`` is the whole fp16 module, or a training checkpoint
whose ``ema`` is), and plain state_dicts of that module. Files are read with
``torch.load(weights_only=True)`` and an allow-list of the classes such checkpoints hold, so reading
one runs no code from it; a file that needs more is refused unless the caller trusts it
(``trust_pickle``). Other versions were not run: 8.3 (which added the YOLO11 head) should build the
same YOLOv8 modules and keys. Newer head designs (YOLO11/12's depthwise class branch, YOLOv10 and
YOLO26's end-to-end heads) and other tasks are refused with a UserError.
"""

import dataclasses
import os
import pathlib
import re

import numpy as np
import torch

from converters.mapping import state_dict_to_variables
from converters.safe_load import DisallowedGlobal, check_not_empty, load_weights_only, unreadable
from xprune_jax import __version__, models
from xprune_jax.checkpoint import Model
from xprune_jax.errors import UserError
from xprune_jax.fileio import file_sha256
from xprune_jax.models.yolov8 import LAYERS, SCALES, fuse_batch_norms, yolov8_spec

SUPPORTED = "YOLOv8 n/s/m/l/x detection checkpoints (Detect head with DFL and NMS, Ultralytics 8.x)"
UNSUPPORTED = "YOLO11/12, YOLOv10, YOLO26, end-to-end heads and other tasks are not supported"
OFFICIAL_NAMES = tuple(f"yolov8{scale}.pt" for scale in SCALES)
DFL_KEY = "model.22.dfl.conv.weight"  # the fixed arange(reg_max) of the DFL, a constant of the Flax model
_YAML_KINDS = {"conv": "Conv", "c2f": "C2f", "sppf": "SPPF", "upsample": "nn.Upsample", "concat": "Concat",
               "detect": "Detect"}
YOLOV8_LAYERS = tuple(_YAML_KINDS[kind] for _, kind, _ in LAYERS)  # the module column of yolov8.yaml
# Pickled module paths of checkpoints saved before Ultralytics 8.0.44, as Ultralytics' own loader maps them.
_LEGACY_MODULES = {"ultralytics.yolo.utils": "ultralytics.utils", "ultralytics.yolo.v8": "ultralytics.models.yolo",
                   "ultralytics.yolo.data": "ultralytics.data"}


@dataclasses.dataclass
class Checkpoint:
    state_dict: dict[str, np.ndarray]  # float32
    yaml: dict | None  # the model's yaml dict, when the file holds a whole DetectionModel
    names: list[str] | None  # class names, when recorded
    version: str | None  # the Ultralytics version that saved the file, when recorded
    imgsz: int  # the training input size (640 when not recorded)


def resolve_weights(weights: str) -> str:
    """A file path, or an official name (``yolov8n.pt``) looked up as Ultralytics does.

    A name is found in the current directory, then in Ultralytics' ``weights_dir`` setting, and
    otherwise downloaded from the Ultralytics release assets into the current directory.
    """
    if os.path.isfile(weights):
        return weights
    if weights not in OFFICIAL_NAMES:
        raise UserError(f"weights file {weights} does not exist: give an existing .pt file or an official name "
                        f"({', '.join(OFFICIAL_NAMES)})")
    from ultralytics.utils import SETTINGS
    from ultralytics.utils.downloads import attempt_download_asset

    try:
        path, reason = attempt_download_asset(weights), "not found"
    except Exception as e:  # ConnectionError, requests' and OS errors
        path, reason = None, f"{e.__class__.__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"
    if not path or not os.path.isfile(path):
        raise UserError(f"could not download {weights} ({reason}); without a network, place the official file in "
                        f"{os.getcwd()} or {os.path.abspath(SETTINGS['weights_dir'])}")
    return path


def allowed_globals() -> list:
    """What a YOLOv8 detection checkpoint of Ultralytics 8.x may name besides tensors and plain data:
    the classes of its modules (``C3f``: a pruned C2f with unequal halves, as `xprune export` writes it), the
    ``IterableSimpleNamespace`` of its ``args``, the loss object that
    trainers before 8.4 left on the EMA model (ultralytics#2842), numpy scalars (``best_fitness``) and
    paths in ``train_args``. Each is allowed under its module path and under the paths that older
    versions pickled it as (``_LEGACY_MODULES``, and the flat ``ultralytics.nn.modules`` of early 8.0):
    the weights-only unpickler looks names up in this list and imports nothing, so
    ``temporary_modules`` plays no part in it."""
    from torch import nn
    from ultralytics.nn import modules
    from ultralytics.nn.modules.block import C3f
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import IterableSimpleNamespace, loss, tal

    classes = (DetectionModel, modules.Conv, modules.C2f, C3f, modules.Bottleneck, modules.SPPF, modules.Concat,
               modules.Detect, modules.DFL, nn.Conv2d, nn.BatchNorm2d, nn.SiLU, nn.Sequential, nn.ModuleList,
               nn.MaxPool2d, nn.Upsample, IterableSimpleNamespace, loss.v8DetectionLoss, loss.BboxLoss, loss.DFLoss,
               tal.TaskAlignedAssigner, nn.BCEWithLogitsLoss)
    allowed = []
    for cls in classes:
        names = {f"{cls.__module__}.{cls.__qualname__}"}
        if cls.__module__.startswith("ultralytics.nn.modules."):
            names.add(f"ultralytics.nn.modules.{cls.__qualname__}")
        names |= {f"{old}{cls.__module__[len(new):]}.{cls.__qualname__}" for old, new in _LEGACY_MODULES.items()
                  if cls.__module__.startswith(new)}
        allowed += [(cls, name) for name in sorted(names)]
    scalar = np.float64(0).__reduce__()[0]  # numpy.{_core,core}.multiarray.scalar(dtype, bytes)
    allowed += [(scalar, f"numpy.{core}.multiarray.scalar") for core in ("core", "_core")]
    allowed += [np.dtype] + [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, bool)]
    path = type(pathlib.Path())  # a path pickled on either OS, as Ultralytics' own loader maps it
    allowed += [(path, f"{module}.{name}") for module in ("pathlib", "pathlib._local")
                for name in ("PosixPath", "WindowsPath")]
    return allowed


def _load_trusted(path: str) -> object:
    """Unpickle anything (``--trust_pickle``), with the legacy module and path aliases of Ultralytics' own loader."""
    import ultralytics.nn.tasks as tasks

    check_not_empty(path)
    other_os_path = "pathlib.PosixPath" if os.name == "nt" else "pathlib.WindowsPath"
    try:
        with tasks.temporary_modules(modules=_LEGACY_MODULES,
                                     attributes={other_os_path: f"pathlib.{type(pathlib.Path()).__name__}"}):
            return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise UserError(f"{path} needs the Python module {e.name!r}, so it is no Ultralytics 8.x checkpoint: "
                        f"give one of the {SUPPORTED}") from None
    except Exception as e:  # torch and pickle raise many types for truncated or foreign files
        raise unreadable(path, e) from None


def read_checkpoint(path: str, trust_pickle: bool = False) -> Checkpoint:
    """An Ultralytics ``.pt`` file (whole pickled ``DetectionModel``) or a plain state_dict file.

    Read with ``torch.load(weights_only=True)`` and :func:`allowed_globals`; a file that needs any
    other global is refused unless ``trust_pickle`` (then it is unpickled as Ultralytics does).
    """
    if trust_pickle:
        obj = _load_trusted(path)
    else:
        try:
            obj = load_weights_only(path, allowed_globals())
        except DisallowedGlobal as e:
            if e.name.startswith("ultralytics.nn."):
                raise UserError(f"{path} holds an Ultralytics {e.name.rsplit('.', 1)[-1]} ({e.name}), which no YOLOv8 "
                                f"detection checkpoint has; supported are {SUPPORTED}; {UNSUPPORTED}") from None
            raise UserError(f"{path} needs the Python global {e.name}, which is not on the allow-list of YOLOv8 "
                            "checkpoint classes, so it was not unpickled (that can run code); if you trust the file, "
                            "pass --trust_pickle (in a config: trust_pickle=True)") from None
    module = (obj.get("ema") or obj.get("model")) if isinstance(obj, dict) else obj
    if isinstance(module, torch.nn.Module):
        if type(module).__name__ != "DetectionModel":
            raise UserError(f"{path} holds a {type(module).__name__}, not an Ultralytics DetectionModel: "
                            f"give one of the {SUPPORTED}")
        names = getattr(module, "names", None)  # {index: name}
        top = obj if isinstance(obj, dict) else {}
        imgsz = (top.get("train_args") or {}).get("imgsz", 640)
        return Checkpoint({k: v.detach().float().numpy() for k, v in module.state_dict().items()},
                          getattr(module, "yaml", None), [names[i] for i in sorted(names)] if names else None,
                          top.get("version"), imgsz if isinstance(imgsz, int) else 640)
    state_dict = obj
    if isinstance(obj, dict):
        state_dict = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), obj)
    if not isinstance(state_dict, dict) or not state_dict or not all(
            isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{path} holds neither an Ultralytics checkpoint (a dict whose 'model' is a DetectionModel) "
                        "nor a state_dict of tensors: give a YOLOv8 .pt file")
    return Checkpoint({k: v.detach().float().numpy() for k, v in state_dict.items()}, None, None, None, 640)


def _unsupported_design(checkpoint: Checkpoint) -> str | None:
    """What the checkpoint is, when its model is not a YOLOv8 detector; None when it is."""
    yaml, keys = checkpoint.yaml, checkpoint.state_dict
    if yaml:
        layers = tuple(row[2] for row in (*yaml.get("backbone", ()), *yaml.get("head", ())))
        if layers != YOLOV8_LAYERS or yaml.get("end2end"):
            name = os.path.splitext(os.path.basename(str(yaml.get("yaml_file", ""))))[0] or "non-YOLOv8"
            return f"a {name} model{' (end-to-end head)' if yaml.get('end2end') else ''}"
    if any(".one2one_" in k for k in keys):
        return "a model with an end-to-end (one-to-one) head"
    if any(re.search(r"\.cv3\.\d+\.0\.0\.", k) for k in keys):
        return "a model with a YOLO11-style (depthwise) class head"
    return None


def identify(checkpoint: Checkpoint, what: str) -> tuple[str, int]:
    """``(scale, num_classes)`` of a YOLOv8 checkpoint, or a UserError naming what it is instead."""
    unsupported = _unsupported_design(checkpoint)
    if unsupported:
        raise UserError(f"{what} is {unsupported}; supported are {SUPPORTED}; {UNSUPPORTED}")
    scale_by_width = {yolov8_spec(scale).convs[0].out: scale for scale in SCALES}
    first, classes = (checkpoint.state_dict.get(k) for k in ("model.0.conv.weight", "model.22.cv3.0.2.weight"))
    if first is None or classes is None or first.shape[0] not in scale_by_width:
        raise UserError(f"{what} holds no YOLOv8 weights (no YOLOv8 model.0 conv or model.22 Detect head): "
                        f"give one of the {SUPPORTED}")
    return scale_by_width[first.shape[0]], int(classes.shape[0])


def _coco_names() -> list[str]:
    from ultralytics.utils import ROOT, YAML

    names = YAML.load(ROOT / "cfg" / "datasets" / "coco.yaml")["names"]
    return [names[i] for i in sorted(names)]


def convert(arch: str | None, weights: str, fuse: bool = False, trust_pickle: bool = False) -> Model:
    """An Ultralytics YOLOv8 checkpoint (a file or an official name) -> a float32 Flax :class:`Model`.

    The scale and the number of classes come from the checkpoint; ``arch`` (``yolov8n`` ...), when
    given, must agree. With ``fuse``, every BatchNorm is folded into its conv (``spec.fused``).
    ``trust_pickle`` unpickles a file that needs more than :func:`allowed_globals` (it can run code).
    """
    import ultralytics

    path = resolve_weights(weights)
    checkpoint = read_checkpoint(path, trust_pickle)
    scale, num_classes = identify(checkpoint, path)
    name = f"yolov8{scale}"
    if arch is not None and arch != name:
        raise UserError(f"{path} holds {name} weights, not {arch}: pass --arch={name}")
    spec = yolov8_spec(scale, num_classes)
    state_dict = dict(checkpoint.state_dict)
    dfl = state_dict.pop(DFL_KEY, None)
    if dfl is not None and not np.array_equal(dfl.reshape(-1), np.arange(spec.detect.reg_max)):
        raise UserError(f"{path}: {DFL_KEY} is not the fixed arange({spec.detect.reg_max}) of YOLOv8's DFL; "
                        f"give one of the {SUPPORTED}")
    variables = state_dict_to_variables(state_dict, models.variable_shapes(name, spec), what=name)
    if fuse:
        spec, variables = fuse_batch_norms(spec, variables)
    names = checkpoint.names or (_coco_names() if num_classes == 80 else [str(i) for i in range(num_classes)])
    meta = {
        "preprocess": {"imgsz": checkpoint.imgsz},
        "categories": names,
        "provenance": {
            "source": "ultralytics", "weights": weights, "file": os.path.abspath(path), "sha256": file_sha256(path),
            "scale": scale, "fused": fuse, "trust_pickle": trust_pickle,
            "checkpoint_ultralytics_version": checkpoint.version, "converter": __name__, "torch": torch.__version__,
            "ultralytics": ultralytics.__version__, "xprune_jax": __version__,
        },
    }
    return Model(name, spec, variables, meta)
