"""Torch reference models for parity checks (tests and the ``parity`` experiment).

Random weights *and* random BN statistics (the defaults of 0 and 1 hide bugs); any layer's output
read with forward hooks, and its gradient x activation by torch autograd.
"""

from typing import Callable

import numpy as np
import torch


def _batch_norms(model):
    return [m for m in model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or type(m).__name__ == "FrozenBatchNorm2d"]


@torch.no_grad()
def randomize_batch_norm(model: torch.nn.Module, calibration: torch.Tensor | None = None, seed: int = 0):
    """Random affine parameters and random running statistics.

    With ``calibration`` images the statistics are first measured on them (so that a deep random
    net does not saturate or blow up and the comparison stays sensitive), then perturbed.
    """
    g = torch.Generator().manual_seed(seed)
    norms = _batch_norms(model)
    for m in norms:
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.6 + 0.7)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    if calibration is not None:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
        model.train()(calibration)
    for m in norms:
        std = m.running_var.sqrt() if calibration is not None else torch.ones_like(m.running_var)
        m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g) * 0.2 * std)
        m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
    return model.eval()


def random_torchvision(arch: str, calibration: torch.Tensor | None = None, seed: int = 0, **kwargs) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(seed)
    return randomize_batch_norm(torchvision.models.get_model(arch, weights=None, **kwargs), calibration, seed)


@torch.no_grad()
def outputs_by_name(model: torch.nn.Module, names, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """The model's output and the outputs of the named submodules, NCHW tensors as NHWC arrays."""
    modules, captured, handles = dict(model.named_modules()), {}, []
    for name in names:
        def hook(_, __, out, name=name):
            out = out.detach().numpy()
            captured[name] = out.transpose(0, 2, 3, 1) if out.ndim == 4 else out
        handles.append(modules[name].register_forward_hook(hook))
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, captured


def gradient_x_activation(model: torch.nn.Module, names, objective: Callable[[], torch.Tensor],
                          as_numpy: bool = True) -> dict[str, np.ndarray]:
    """Every named layer's a * dL/da by torch autograd, the Captum LayerGradientXActivation recipe for
    many layers at once: forward hooks keep each output and retain its gradient, ``objective()`` runs
    the model and returns the scalar L, which is back-propagated once.

    Returns ``[B, positions, channels]`` per layer: NCHW outputs in (y, x) order, a Linear's ``[N, C]``
    as ``[N, 1, C]``; a module called several times (a head shared over pyramid levels) has its calls
    concatenated along positions, in call order. Layers the objective does not reach give zeros.
    ``as_numpy=False`` leaves them torch tensors on the model's device (to reduce them there).
    """
    modules, outputs = dict(model.named_modules()), {}

    def keep(name):
        def hook(_, __, out):
            if out.requires_grad:
                out.retain_grad()
            outputs.setdefault(name, []).append(out)
        return hook

    handles = [modules[n].register_forward_hook(keep(n)) for n in names]
    try:
        objective().backward()
    finally:
        for h in handles:
            h.remove()
    result = {}
    for name, calls in outputs.items():
        parts = []
        for a in calls:
            ag = (a * a.grad if a.grad is not None else torch.zeros_like(a)).detach()
            parts.append(ag.permute(0, 2, 3, 1).reshape(ag.shape[0], -1, ag.shape[1]) if ag.ndim == 4 else ag[:, None])
        result[name] = torch.cat(parts, dim=1).numpy() if as_numpy else torch.cat(parts, dim=1)
    return result


def detection_confidence(model: torch.nn.Module, x: torch.Tensor, image_sizes: list) -> torch.Tensor:
    """The confidence objective of a torchvision detector, from its internals as its forward runs them: the sum
    over images of the top-100 pre-NMS scores (RetinaNet: sigmoid over all anchors, classes and
    levels; Faster R-CNN: each proposal's best non-background softmax score)."""
    import torchvision

    from xprune_jax.detection import CONFIDENCE_TOP_K

    features = model.backbone(x)
    if hasattr(model, "rpn"):
        images = torchvision.models.detection.image_list.ImageList(x, image_sizes)
        proposals, _ = model.rpn(images, features)
        heads = model.roi_heads
        logits, _ = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, proposals, image_sizes)))
        best = torch.softmax(logits, -1)[:, 1:].max(-1).values.split([len(p) for p in proposals])
        return sum(torch.topk(b, min(CONFIDENCE_TOP_K, len(b))).values.sum() for b in best)
    scores = torch.sigmoid(model.head(list(features.values()))["cls_logits"]).flatten(1)
    return torch.topk(scores, CONFIDENCE_TOP_K, dim=-1).values.sum()


def relative_error(got, want) -> float:
    """max |got - want| relative to the scale (max |want|) of the reference tensor."""
    want = np.asarray(want, np.float64)
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / max(np.max(np.abs(want)), 1e-12))
