"""Pruned torchvision models as torch modules, from the files ``xprune export --format=torch`` writes.

A file holds ``{"arch", "spec", "state_dict", "categories", "preprocess"}`` (``torch.save``; plain data
and tensors, so ``torch.load(weights_only=True)`` reads it). The spec is the dict of
``xprune_jax.spec.spec_to_dict``; this module reads it as plain data, so loading needs torch and
torchvision only, never JAX or the rest of this package. The module is torchvision's own classes,
built from the spec, then edited as pruning edited the Flax model (the spec's ``edits``), with nothing
written per pruning case: every conv, linear layer and norm takes the shape of its weight in the
state_dict (:func:`narrow`), a removed unit becomes ``nn.Identity`` (state_dict keys stay the Flax paths,
which are torchvision's), and a ShuffleNetV2 unit whose channel selections pruning edited (its split
and shuffle) is a :class:`RoutedShuffleUnit`.

    model = converters.load_pruned("pruned.pt")  # eval mode
"""

import collections
import functools

import torch
import torchvision
from torch import nn
from torchvision.models import mobilenetv2, resnet, shufflenetv2
from torchvision.models.detection import FasterRCNN, RetinaNet, anchor_utils, backbone_utils, faster_rcnn, retinanet
from torchvision.ops import misc, feature_pyramid_network

ARCH_PREFIXES = ("resnet", "mobilenet_v2", "shufflenet_v2", "fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn",
                 "retinanet_resnet50_fpn")


def load_pruned(path: str) -> nn.Module:
    """The eval-mode torch module of a file written by ``xprune export --format=torch``."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or not {"arch", "spec", "state_dict"} <= set(data):
        raise ValueError(f"{path} is no pruned-model file: it needs the keys arch, spec and state_dict "
                         "(write one with `xprune export --format=torch`)")
    model = build(data["arch"], data["spec"], {k: tuple(v.shape) for k, v in data["state_dict"].items()})
    model.load_state_dict(data["state_dict"], strict=True)
    return model.eval()


def build(arch: str, spec: dict, shapes: dict[str, tuple]) -> nn.Module:
    """The torch module (random weights) of ``arch`` built from ``spec``, its removed units the identity,
    narrowed to ``shapes`` (state_dict key -> shape)."""
    builders = {"ResNetSpec": resnet_classifier, "MobileNetV2Spec": mobilenet_v2, "ShuffleNetV2Spec": shufflenet_v2,
                "FasterRCNNSpec": faster_rcnn_resnet_fpn, "FasterRCNNMobileNetSpec": faster_rcnn_mobilenet_v3_fpn,
                "RetinaNetSpec": retinanet_resnet_fpn}
    if spec.get("type") not in builders or not arch.startswith(ARCH_PREFIXES):
        raise ValueError(f"no torch module for {arch} with a {spec.get('type')}; torch files hold "
                         f"{', '.join(ARCH_PREFIXES)} models")
    module = builders[spec["type"]](spec)
    for path, how in (spec.get("edits") or {}).get("removed", ()):
        if how != "identity":
            raise ValueError(f"{arch}: a unit removed as {how!r} ({path}) has no torch module here")
        replace(module, path, nn.Identity())
    return narrow(module, shapes)


def replace(module: nn.Module, path: str, new: nn.Module) -> None:
    """Set the submodule at the dotted ``path`` of ``module`` to ``new``."""
    parent, _, name = path.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, name, new)


def narrow(module: nn.Module, shapes: dict[str, tuple]) -> nn.Module:
    """``module`` with every ``Conv2d``, ``Linear`` and batch norm whose weight in ``shapes`` differs rebuilt at
    that shape, with its other settings (a depthwise conv stays depthwise); everything else is untouched."""
    for name, m in list(module.named_modules()):
        shape = shapes.get(f"{name}.weight")
        if shape is None or tuple(shape) == tuple(m.weight.shape):
            continue
        if isinstance(m, nn.Conv2d):
            depthwise = 1 < m.groups == m.in_channels == m.out_channels
            groups = shape[0] if depthwise else m.groups
            new = nn.Conv2d(shape[1] * groups, shape[0], m.kernel_size, m.stride, m.padding, m.dilation, groups,
                            bias=m.bias is not None)
        elif isinstance(m, nn.Linear):
            new = nn.Linear(shape[1], shape[0], bias=m.bias is not None)
        elif isinstance(m, nn.BatchNorm2d):
            new = nn.BatchNorm2d(shape[0], m.eps, m.momentum)
        elif isinstance(m, misc.FrozenBatchNorm2d):
            new = misc.FrozenBatchNorm2d(shape[0], m.eps)
        else:
            raise ValueError(f"{name}: no narrowing for a {type(m).__name__}")
        replace(module, name, new)
    return module


def _named(blocks: list[tuple[str, nn.Module]]) -> nn.Sequential:
    """An ``nn.Sequential`` whose children keep their torch names (``"0", "2", "3"`` when ``1`` was removed)."""
    return nn.Sequential(collections.OrderedDict(blocks))


def _index(name: str) -> str:
    return name.rsplit(".", 1)[1]


# --- ResNet --------------------------------------------------------------------------------------


def _residual_block(block: dict, kind: str, in_ch: int, norm) -> nn.Module:
    widths, out, stride = block["widths"], block["out"], block["stride"]
    if kind == "bottleneck":
        m = resnet.Bottleneck(in_ch, 1, norm_layer=norm)
        m.conv1, m.bn1 = resnet.conv1x1(in_ch, widths[0]), norm(widths[0])
        m.conv2, m.bn2 = resnet.conv3x3(widths[0], widths[1], stride), norm(widths[1])
        m.conv3, m.bn3 = resnet.conv1x1(widths[1], out), norm(out)
    else:
        m = resnet.BasicBlock(in_ch, 1, norm_layer=norm)
        m.conv1, m.bn1 = resnet.conv3x3(in_ch, widths[0], stride), norm(widths[0])
        m.conv2, m.bn2 = resnet.conv3x3(widths[0], out), norm(out)
    m.stride = stride
    m.downsample = nn.Sequential(resnet.conv1x1(in_ch, out, stride), norm(out)) if block["downsample"] else None
    return m


def resnet_body(spec: dict, norm) -> tuple[nn.Module, dict[str, int]]:
    """torchvision's ResNet (no classifier yet) with the spec's stem, blocks and widths, and each stage's output width."""
    model = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], norm_layer=norm)
    model.conv1 = nn.Conv2d(3, spec["stem"], kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = norm(spec["stem"])
    stages, width, widths = collections.defaultdict(list), spec["stem"], {}
    for block in spec["blocks"]:
        stage = block["name"].split(".")[0]
        stages[stage].append((_index(block["name"]), _residual_block(block, spec["block"], width, norm)))
        width = widths[stage] = block["out"]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        setattr(model, stage, _named(stages[stage]))
    return model, widths


def resnet_classifier(spec: dict) -> nn.Module:
    model, widths = resnet_body(spec, functools.partial(nn.BatchNorm2d, eps=spec.get("bn_eps", 1e-5)))
    model.fc = nn.Linear(widths[max(widths)], spec["num_classes"])
    return model


# --- MobileNetV2 ---------------------------------------------------------------------------------


def _inverted_residual(block: dict, in_ch: int) -> nn.Module:
    m = mobilenetv2.InvertedResidual(in_ch, block["out"], block["stride"], 1)
    hidden, layers = block["hidden"], []
    if block["expand"]:
        layers.append(misc.Conv2dNormActivation(in_ch, hidden, kernel_size=1, activation_layer=nn.ReLU6))
    layers += [misc.Conv2dNormActivation(hidden, hidden, stride=block["stride"], groups=hidden,
                                         activation_layer=nn.ReLU6),
               nn.Conv2d(hidden, block["out"], 1, 1, 0, bias=False), nn.BatchNorm2d(block["out"])]
    m.conv = nn.Sequential(*layers)
    residual = block.get("residual")
    m.use_res_connect = block["stride"] == 1 and in_ch == block["out"] if residual is None else residual
    return m


def mobilenet_v2(spec: dict) -> nn.Module:
    model = mobilenetv2.MobileNetV2(num_classes=spec["num_classes"])
    features = [("0", misc.Conv2dNormActivation(3, spec["stem"], stride=2, activation_layer=nn.ReLU6))]
    width = spec["stem"]
    for block in spec["blocks"]:
        features.append((_index(block["name"]), _inverted_residual(block, width)))
        width = block["out"]
    features.append(("18", misc.Conv2dNormActivation(width, spec["last"], kernel_size=1, activation_layer=nn.ReLU6)))
    model.features = _named(features)
    model.classifier[1] = nn.Linear(spec["last"], spec["num_classes"])
    return model


# --- ShuffleNetV2 --------------------------------------------------------------------------------


class RoutedShuffleUnit(shufflenetv2.InvertedResidual):
    """torchvision's ShuffleNetV2 unit with explicit channel routing: a stride-1 unit passes its input
    channels ``left`` by the branch, which reads ``right``, and the output is ``concat(left, branch)[:, order]``
    in place of the channel shuffle (None: torchvision's halves and shuffle)."""

    def __init__(self, stride: int, left: list[int] | None, right: list[int] | None, order: list[int] | None):
        super().__init__(2 // stride, 2, stride)  # placeholder branches, replaced by the caller
        for name, index in (("left", left), ("right", right), ("order", order)):
            self.register_buffer(name, None if index is None else torch.tensor(index, dtype=torch.long),
                                 persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            half = x.shape[1] // 2
            left = x[:, :half] if self.left is None else x.index_select(1, self.left)
            right = x[:, half:] if self.right is None else x.index_select(1, self.right)
            out = torch.cat((left, self.branch2(right)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return shufflenetv2.channel_shuffle(out, 2) if self.order is None else out.index_select(1, self.order)


def _shuffle_unit(unit: dict, in_ch: int, selections: dict) -> nn.Module:
    """The unit at the widths of its spec fields (``narrow`` then takes the pruned ones); routed where pruning
    edited its selections (``{unit}.left``, ``.right``, ``.order``), or by the ``split``/``order`` fields of
    files pruned before edits."""
    stride, split = unit["stride"], unit.get("split")
    left, right, order = (selections.get(f"{unit['name']}.{n}") for n in ("left", "right", "order"))
    if split is not None:
        left, right = list(range(split)), list(range(split, in_ch))
    order = unit.get("order") if order is None else order
    routed = left is not None or right is not None or order is not None
    m = RoutedShuffleUnit(stride, left, right, order) if routed else shufflenetv2.InvertedResidual(2 // stride, 2, stride)
    m.branch1 = nn.Sequential()
    if stride > 1:
        m.branch1 = nn.Sequential(
            shufflenetv2.InvertedResidual.depthwise_conv(in_ch, in_ch, 3, stride, 1), nn.BatchNorm2d(in_ch),
            nn.Conv2d(in_ch, unit["branch1"], 1, bias=False), nn.BatchNorm2d(unit["branch1"]), nn.ReLU(inplace=True))
    if unit.get("branch2") is None:  # a unit removed before edits: the branch passes its input
        m.branch2 = nn.Identity()
        return m
    mid, out = unit["branch2"]
    branch_in = in_ch if stride > 1 else in_ch - (in_ch // 2 if split is None else split)
    m.branch2 = nn.Sequential(
        nn.Conv2d(branch_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        shufflenetv2.InvertedResidual.depthwise_conv(mid, mid, 3, stride, 1), nn.BatchNorm2d(mid),
        nn.Conv2d(mid, out, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True))
    return m


def _shuffle_unit_width(unit: dict, in_ch: int) -> int:
    if unit["stride"] > 1:
        left = unit["branch1"]
        right = in_ch if unit.get("branch2") is None else unit["branch2"][1]
    else:
        left = in_ch // 2 if unit.get("split") is None else unit["split"]
        right = in_ch - left if unit.get("branch2") is None else unit["branch2"][1]
    return left + right if unit.get("order") is None else len(unit["order"])


def shufflenet_v2(spec: dict) -> nn.Module:
    model = shufflenetv2.ShuffleNetV2([1, 1, 1], [24, 48, 96, 192, 1024], num_classes=spec["num_classes"])
    model.conv1 = nn.Sequential(nn.Conv2d(3, spec["stem"], 3, 2, 1, bias=False), nn.BatchNorm2d(spec["stem"]),
                                nn.ReLU(inplace=True))
    stages, width = collections.defaultdict(list), spec["stem"]
    selections = {name: list(index) for name, index in (spec.get("edits") or {}).get("channels", ())}
    for unit in spec["units"]:
        stages[unit["name"].split(".")[0]].append((_index(unit["name"]), _shuffle_unit(unit, width, selections)))
        width = _shuffle_unit_width(unit, width)
    for stage in ("stage2", "stage3", "stage4"):
        setattr(model, stage, _named(stages[stage]))
    model.conv5 = nn.Sequential(nn.Conv2d(width, spec["last"], 1, bias=False), nn.BatchNorm2d(spec["last"]),
                                nn.ReLU(inplace=True))
    model.fc = nn.Linear(spec["last"], spec["num_classes"])
    return model


# --- Faster R-CNN and RetinaNet ------------------------------------------------------------------


def _frozen_body(spec: dict, stages: list[str]) -> tuple[nn.Module, list[int]]:
    """The ResNet body with FrozenBatchNorm2d (the spec's eps, 0 as the COCO_V1 builders leave it), as
    ``IntermediateLayerGetter`` returning ``stages``, and their widths."""
    body = spec["body"]
    model, widths = resnet_body(body, functools.partial(misc.FrozenBatchNorm2d, eps=body.get("bn_eps", 0.0)))
    return model, [widths[s] for s in stages]


def _conv(in_ch: int, out: int, kernel: int, relu: bool = False) -> misc.Conv2dNormActivation:
    return misc.Conv2dNormActivation(in_ch, out, kernel_size=kernel, padding=kernel // 2, norm_layer=None,
                                     activation_layer=nn.ReLU if relu else None)


def _fpn_backbone(spec: dict, extra_blocks) -> backbone_utils.BackboneWithFPN:
    stages = list(spec["fpn_stages"])
    body, in_widths = _frozen_body(spec, stages)
    width, inner = spec["fpn_width"], spec.get("fpn_inner_width") or spec["fpn_width"]
    backbone = backbone_utils.BackboneWithFPN(body, {s: str(i) for i, s in enumerate(stages)}, in_widths, width,
                                              extra_blocks=extra_blocks)
    fpn = backbone.fpn
    fpn.inner_blocks = nn.ModuleList(_conv(w, inner, 1) for w in in_widths)
    fpn.layer_blocks = nn.ModuleList(_conv(inner, width, 3) for _ in in_widths)
    return backbone


def _transform_kwargs(spec: dict) -> dict:
    t = spec.get("transform") or {}
    defaults = {"min_size": 800, "max_size": 1333, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                "size_divisible": 32}
    t = {**defaults, **t}
    return {"min_size": t["min_size"], "max_size": t["max_size"], "image_mean": list(t["mean"]),
            "image_std": list(t["std"]), "size_divisible": t["size_divisible"]}


def _anchor_generator(spec: dict) -> anchor_utils.AnchorGenerator:
    sizes = tuple(tuple(s) for s in spec["anchor_sizes"])
    return anchor_utils.AnchorGenerator(sizes, (tuple(spec["aspect_ratios"]),) * len(sizes))


def faster_rcnn_resnet_fpn(spec: dict) -> FasterRCNN:
    backbone = _fpn_backbone(spec, feature_pyramid_network.LastLevelMaxPool())
    width = spec["fpn_width"]
    rpn_width = spec.get("rpn_width") or width
    fc6, fc7 = spec["representation_size"], spec.get("fc7_width") or spec["representation_size"]
    anchors = _anchor_generator(spec)
    rpn_head = faster_rcnn.RPNHead(width, anchors.num_anchors_per_location()[0])
    rpn_head.conv = nn.Sequential(_conv(width, rpn_width, 3, relu=True))
    rpn_head.cls_logits = nn.Conv2d(rpn_width, anchors.num_anchors_per_location()[0], 1)
    rpn_head.bbox_pred = nn.Conv2d(rpn_width, 4 * anchors.num_anchors_per_location()[0], 1)
    box_head = faster_rcnn.TwoMLPHead(width * spec["roi_size"] ** 2, fc6)
    box_head.fc7 = nn.Linear(fc6, fc7)
    roi_pool = torchvision.ops.MultiScaleRoIAlign([str(i) for i in range(len(spec["fpn_stages"]))], spec["roi_size"],
                                                  spec["roi_sampling_ratio"])
    return FasterRCNN(
        backbone, num_classes=None, rpn_anchor_generator=anchors, rpn_head=rpn_head, box_roi_pool=roi_pool,
        box_head=box_head, box_predictor=faster_rcnn.FastRCNNPredictor(fc7, spec["num_classes"]),
        **_faster_rcnn_settings(spec))


def _faster_rcnn_settings(spec: dict) -> dict:
    return {"rpn_pre_nms_top_n_test": spec["rpn_pre_nms_top_n"], "rpn_post_nms_top_n_test": spec["rpn_post_nms_top_n"],
            "rpn_nms_thresh": spec["rpn_nms_thresh"], "rpn_score_thresh": spec["rpn_score_thresh"],
            "box_score_thresh": spec["score_thresh"], "box_nms_thresh": spec["nms_thresh"],
            "box_detections_per_img": spec["detections_per_img"], **_transform_kwargs(spec)}


def faster_rcnn_mobilenet_v3_fpn(spec: dict) -> FasterRCNN:
    """torchvision's own ``fasterrcnn_mobilenet_v3_large_fpn`` (its anchors are the spec's defaults), its
    backbone's BatchNorms frozen as the COCO_V1 builder leaves them."""
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=spec["num_classes"], **_faster_rcnn_settings(spec))
    eps = spec["body"].get("bn_eps", 1e-5)
    for name, m in list(model.backbone.body.named_modules()):
        if isinstance(m, nn.BatchNorm2d):
            replace(model.backbone.body, name, misc.FrozenBatchNorm2d(m.num_features, eps))
    return model


def _subnet(in_ch: int, widths: list[int]) -> nn.Sequential:
    layers = []
    for width in widths:
        layers.append(_conv(in_ch, width, 3, relu=True))
        in_ch = width
    return nn.Sequential(*layers)


def retinanet_resnet_fpn(spec: dict) -> RetinaNet:
    width = spec["fpn_width"]
    backbone = _fpn_backbone(spec, feature_pyramid_network.LastLevelP6P7(width, width))
    anchors = _anchor_generator(spec)
    num_anchors, depth = anchors.num_anchors_per_location()[0], spec["head_depth"]
    head = retinanet.RetinaNetHead(width, num_anchors, spec["num_classes"])
    classification = list(spec.get("classification_widths") or [width] * depth)
    regression = list(spec.get("regression_widths") or [width] * depth)
    head.classification_head.conv = _subnet(width, classification)
    head.classification_head.cls_logits = nn.Conv2d(classification[-1], num_anchors * spec["num_classes"], 3, padding=1)
    head.regression_head.conv = _subnet(width, regression)
    head.regression_head.bbox_reg = nn.Conv2d(regression[-1], 4 * num_anchors, 3, padding=1)
    return RetinaNet(backbone, spec["num_classes"], anchor_generator=anchors, head=head,
                     score_thresh=spec["score_thresh"], nms_thresh=spec["nms_thresh"],
                     detections_per_img=spec["detections_per_img"], topk_candidates=spec["topk_candidates"],
                     **_transform_kwargs(spec))
