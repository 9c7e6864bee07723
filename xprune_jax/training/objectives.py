"""Fine-tuning objectives: distillation from a teacher (label-free), feature distillation on the neck, and the
task loss against ground truth, weighted by :class:`Objective` and summed.

Each architecture family is a :class:`Family`: how to run a model for training (BatchNorm in train mode,
its head outputs and neck features) and how its heads are distilled. Every loss is a pure jittable
function of arrays; each is zero, with a zero gradient, when the student equals the teacher.

- **Classifiers**: KL(teacher || student) of the temperature-softened softmax, times T^2 (Hinton), mean
  over the images; task: cross-entropy.
- **YOLOv8**: the raw head maps. Box: KL of each side's DFL distribution (softmax over ``reg_max`` bins,
  tempered), weighted per anchor by the teacher's best class probability (background anchors' boxes
  mean nothing). Class: the binary KL of each class's tempered sigmoid, summed over classes, mean over
  anchors. Task: Ultralytics' v8DetectionLoss (box + cls + dfl, gained; not multiplied by the batch).
- **RetinaNet**: class logits as YOLOv8's; box regression: smooth L1 of the deltas, weighted by the
  teacher's best class probability. Task: focal + L1 (torchvision's).
- **Faster R-CNN**: RPN objectness (binary KL) and deltas (smooth L1 weighted by the teacher's
  objectness probability); the box head on the teacher's top ``rcnn_rois`` proposals (by objectness),
  run by both models: softmax KL of the class logits and smooth L1 of the per-class deltas weighted by
  the teacher's foreground class probabilities. Task: torchvision's RPN + RoI losses (the model's
  training forward).
- **Features** (detectors): the relative squared error ``mean((s - t)^2) / mean(t^2)`` of each neck level
  (YOLOv8's Detect inputs P3-P5, the FPN levels), averaged over the levels. Only levels of equal shape
  are compared: a pruned neck narrower than the teacher's is left out rather than bridged by a learned
  adapter, which would add parameters the pruned model does not have (:func:`feature_levels` lists the
  compared levels; none at all is an error).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from xprune_jax import models
from xprune_jax.errors import UserError
from xprune_jax.models.layers import BATCH_STATS, INTERMEDIATES

TERMS = ("distill", "feature", "task")


@dataclasses.dataclass(frozen=True)
class Objective:
    """Weights of the summed terms, the distillation temperature, and Faster R-CNN's distilled RoIs."""

    distill: float = 1.0
    feature: float = 0.0
    task: float = 0.0
    temperature: float = 1.0
    rcnn_rois: int = 256

    @property
    def needs_teacher(self) -> bool:
        return self.distill > 0 or self.feature > 0


def parse_objective(text: str) -> Objective:
    """``"distill"``, ``"task"``, ``"distill=1,task=0.5,feature=0.1,temperature=2"``: the terms named are on
    (weight 1 unless given), the others off; '' is distillation alone."""
    if not text.strip():
        return Objective()
    fields, terms = {}, {}
    for part in text.split(","):
        name, _, value = part.strip().partition("=")
        valid = (*TERMS, "temperature", "rcnn_rois")
        if name not in valid:
            raise UserError(f"bad --objective term {name!r}: use comma-separated {', '.join(valid)} with optional "
                            "=value, e.g. --objective=distill=1,task=0.5")
        try:
            number = (int if name == "rcnn_rois" else float)(value) if value else 1.0
        except ValueError:
            raise UserError(f"bad --objective value {part.strip()!r}: give a number, e.g. {name}=0.5") from None
        (terms if name in TERMS else fields)[name] = number
    if any(v < 0 for v in terms.values()) or fields.get("temperature", 1.0) <= 0 or fields.get("rcnn_rois", 1) < 1:
        raise UserError(f"bad --objective {text!r}: weights must be >= 0, the temperature and rcnn_rois > 0")
    objective = Objective(**{**{t: 0.0 for t in TERMS}, **terms, **fields})
    if not any(getattr(objective, t) for t in TERMS):
        raise UserError(f"--objective {text!r} turns every term off; weight at least one of {', '.join(TERMS)}")
    return objective


def kl_softmax(student, teacher, temperature: float = 1.0, axis: int = -1):
    """KL(softmax(teacher / T) || softmax(student / T)) * T^2 along ``axis``."""
    log_t = jax.nn.log_softmax(teacher / temperature, axis=axis)
    log_s = jax.nn.log_softmax(student / temperature, axis=axis)
    return jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=axis) * temperature ** 2


def kl_sigmoid(student, teacher, temperature: float = 1.0):
    """Elementwise binary KL of sigmoid(teacher / T) and sigmoid(student / T), times T^2."""
    s, t = student / temperature, teacher / temperature
    p = jax.nn.sigmoid(t)
    kl = (p * (jax.nn.log_sigmoid(t) - jax.nn.log_sigmoid(s))
          + (1 - p) * (jax.nn.log_sigmoid(-t) - jax.nn.log_sigmoid(-s)))
    return kl * temperature ** 2


def smooth_l1(x, beta: float = 1 / 9):
    ax = jnp.abs(x)
    return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def _weighted_mean(values, weights):
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-6)


def feature_levels(student: dict, teacher: dict) -> list[str]:
    """The neck levels feature distillation compares: those of equal shape in both."""
    return [n for n in teacher if n in student and student[n].shape == teacher[n].shape]


def feature_loss(student: dict, teacher: dict) -> jax.Array:
    """Mean over the :func:`feature_levels` of ``mean((s - t)^2) / mean(t^2)``."""
    names = feature_levels(student, teacher)
    if not names:
        return jnp.zeros(())
    return sum(jnp.mean(jnp.square(student[n] - teacher[n])) / (jnp.mean(jnp.square(teacher[n])) + 1e-6)
               for n in names) / len(names)


def _apply(module, variables: dict, *args, train: bool, **kwargs):
    """``(outputs, {layer: activation}, batch_stats)``; ``train`` runs BatchNorm in train mode."""
    mutable = [INTERMEDIATES, BATCH_STATS] if train else [INTERMEDIATES]
    out, state = module.apply(variables, *args, mutable=mutable, **kwargs)
    return out, models.flatten_names(state[INTERMEDIATES]), state.get(BATCH_STATS, variables.get(BATCH_STATS))


@dataclasses.dataclass(frozen=True)
class Family:
    """How one family of architectures trains: :meth:`run` gives ``{"heads", "features", "task"}``."""

    spec: Any
    module: Any

    def num_classes(self) -> int:
        return self.spec.num_classes

    def run(self, variables, batch, train: bool, teacher: dict | None, objective: Objective) -> tuple[dict, Any]:
        raise NotImplementedError

    def distill(self, student: dict, teacher: dict, objective: Objective) -> dict:
        raise NotImplementedError


class Classifier(Family):
    def run(self, variables, batch, train, teacher, objective):
        logits, _, stats = _apply(self.module, variables, batch["images"], train=train)
        task = {}
        if objective.task and "labels" in batch:
            task["cross_entropy"] = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]))
        return {"heads": {"logits": logits}, "features": {}, "task": task}, stats

    def distill(self, student, teacher, objective):
        return {"logits": jnp.mean(kl_softmax(student["logits"], teacher["logits"], objective.temperature))}


class YOLOv8Family(Family):
    def num_classes(self) -> int:
        return self.spec.detect.num_classes

    def run(self, variables, batch, train, teacher, objective):
        from xprune_jax.losses.yolov8 import detection_loss, flatten_head_maps, head_maps_from_intermediates
        from xprune_jax.models.yolov8 import LAYERS, layer_sources

        _, inter, stats = _apply(self.module, variables, batch["images"], train=train)
        head = f"model.{len(LAYERS) - 1}"
        box_maps, class_maps = head_maps_from_intermediates(inter, head, levels=len(self.spec.detect.strides))
        boxes, logits, _ = flatten_head_maps(box_maps, class_maps)
        task = {}
        if objective.task and "gt_boxes" in batch:
            loss = detection_loss(box_maps, class_maps, batch["gt_boxes"], batch["gt_classes"], batch["gt_mask"])
            task = {k: loss[k] for k in ("box", "cls", "dfl")}
        features = {f"model.{i}": inter[f"model.{i}"] for i in layer_sources(len(LAYERS) - 1)}
        return {"heads": {"boxes": boxes, "logits": logits}, "features": features, "task": task}, stats

    def distill(self, student, teacher, objective):
        t, reg_max = objective.temperature, self.spec.detect.reg_max
        bins = lambda x: x.reshape(*x.shape[:-1], 4, reg_max)  # noqa: E731
        box_kl = jnp.mean(kl_softmax(bins(student["boxes"]), bins(teacher["boxes"]), t), axis=-1)  # [B, A]
        weight = jnp.max(jax.nn.sigmoid(teacher["logits"]), axis=-1)
        return {"boxes": _weighted_mean(box_kl, weight),
                "logits": jnp.mean(jnp.sum(kl_sigmoid(student["logits"], teacher["logits"], t), axis=-1))}


def _fpn_features(spec, inter: dict, extra: str) -> dict:
    from xprune_jax.models.rcnn import fpn_level_names

    return {f"backbone.fpn.{n}": inter[f"backbone.fpn.{n}"] for n in fpn_level_names(len(spec.fpn_stages), extra)}


class RetinaNetFamily(Family):
    def run(self, variables, batch, train, teacher, objective):
        from xprune_jax.losses.rcnn import retinanet_head_outputs
        from xprune_jax.models.rcnn import retinanet_intermediates_loss

        _, inter, stats = _apply(self.module, variables, batch["images"], train=train)
        logits, deltas = retinanet_head_outputs(inter, self.spec.num_classes)
        task = {}
        if objective.task and "gt_boxes" in batch:
            loss = retinanet_intermediates_loss(self.spec, inter, batch["images"].shape[1:3], batch["gt_boxes"],
                                                batch["gt_classes"], batch["gt_mask"])
            task = {k: loss[k] for k in ("classification", "bbox_regression")}
        return {"heads": {"logits": logits, "deltas": deltas}, "features": _fpn_features(self.spec, inter, "p6p7"),
                "task": task}, stats

    def distill(self, student, teacher, objective):
        t = objective.temperature
        weight = jnp.max(jax.nn.sigmoid(teacher["logits"]), axis=-1)
        box = jnp.sum(smooth_l1(student["deltas"] - teacher["deltas"]), axis=-1)
        return {"deltas": _weighted_mean(box, weight),
                "logits": jnp.mean(jnp.sum(kl_sigmoid(student["logits"], teacher["logits"], t), axis=-1))}


class FasterRCNNFamily(Family):
    """The teacher (``train=False``) runs its inference forward (its proposals and their box-head outputs are
    captured); the student runs its RPN and its box head on the teacher's top proposals
    (``FasterRCNN(rois=...)``), plus torchvision's training forward when the task loss is on."""

    def run(self, variables, batch, train, teacher, objective):
        images, batch_size, n = batch["images"], batch["images"].shape[0], objective.rcnn_rois
        heads, out = {}, {}
        if not train:  # the teacher: its inference forward, its top proposals and their box-head outputs
            _, inter, stats = _apply(self.module, variables, images, train=train)
            proposals, num = inter["rpn.proposals"][:, :n], inter["rpn.proposals"].shape[1]
            heads = {"rois": proposals, "rois_valid": jnp.any(proposals != 0, axis=-1),
                     "rois_logits": inter["roi_heads.box_predictor.cls_score"].reshape(batch_size, num, -1)[:, :n],
                     "rois_deltas": inter["roi_heads.box_predictor.bbox_pred"].reshape(batch_size, num, -1, 4)[:, :n]}
        else:
            targets = batch.get("model_targets") if objective.task else None
            rois = teacher["heads"]["rois"] if teacher is not None else None
            out, inter, stats = _apply(self.module, variables, images, targets, rois=rois, train=train)
            if rois is not None:
                heads = {"rois_logits": out["rois_logits"], "rois_deltas": out["rois_deltas"]}
        heads.update({"objectness": inter["rpn.objectness"],
                      "rpn_deltas": inter["rpn.head.bbox_pred"].reshape(batch_size, -1, 4)})
        task = {k: out[k] for k in ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")
                if k in out}
        return {"heads": heads, "features": _fpn_features(self.spec, inter, "pool"), "task": task}, stats

    def distill(self, student, teacher, objective):
        t = objective.temperature
        rpn_box = jnp.sum(smooth_l1(student["rpn_deltas"] - teacher["rpn_deltas"]), axis=-1)
        valid = teacher["rois_valid"].astype(jnp.float32)
        probs = jax.nn.softmax(teacher["rois_logits"], axis=-1)[..., 1:]  # foreground classes
        roi_box = jnp.sum(smooth_l1(student["rois_deltas"] - teacher["rois_deltas"])[..., 1:, :], axis=-1)
        return {"objectness": jnp.mean(kl_sigmoid(student["objectness"], teacher["objectness"], t)),
                "rpn_deltas": _weighted_mean(rpn_box, jax.nn.sigmoid(teacher["objectness"])),
                "rois_logits": _weighted_mean(kl_softmax(student["rois_logits"], teacher["rois_logits"], t), valid),
                "rois_deltas": _weighted_mean(roi_box, probs * valid[..., None])}


def family(arch: str, spec) -> Family:
    task = models.get_architecture(arch).task
    module = models.build(arch, spec)
    if task == "classification":
        return Classifier(spec, module)
    if arch.startswith("yolov8"):
        return YOLOv8Family(spec, module)
    if arch.startswith("retinanet"):
        return RetinaNetFamily(spec, module)
    if arch.startswith("fasterrcnn"):
        return FasterRCNNFamily(spec, module)
    raise UserError(f"fine-tuning is not implemented for {arch}")


def objective_loss(student: Family, teacher: Family | None, objective: Objective):
    """``loss(params, batch_stats, teacher_variables, batch) -> (total, (terms, new batch_stats))``, pure and
    jittable: the student in train mode, the teacher (when a term needs it) in inference mode without
    gradient. ``terms`` holds every weighted term's value and each distilled head's."""

    def loss(params, batch_stats, teacher_variables, batch):
        teacher_out = None
        if objective.needs_teacher:
            teacher_out, _ = teacher.run(teacher_variables, batch, False, None, dataclasses.replace(objective, task=0.0))
            teacher_out = jax.lax.stop_gradient(teacher_out)
        out, stats = student.run({"params": params, BATCH_STATS: batch_stats}, batch, True, teacher_out, objective)
        terms, total = {}, jnp.zeros((), jnp.float32)
        if objective.distill:
            heads = student.distill(out["heads"], teacher_out["heads"], objective)
            terms.update({f"distill/{k}": v for k, v in heads.items()})
            terms["distill"] = sum(heads.values())
            total += objective.distill * terms["distill"]
        if objective.feature:
            terms["feature"] = feature_loss(out["features"], teacher_out["features"])
            total += objective.feature * terms["feature"]
        if objective.task:
            terms.update({f"task/{k}": v for k, v in out["task"].items()})
            terms["task"] = sum(out["task"].values())
            total += objective.task * terms["task"]
        return total, (terms, stats)

    return loss
