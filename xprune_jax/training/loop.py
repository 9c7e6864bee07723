"""The fine-tuning loop: one jitted train step (optax), the batch sharded over the data mesh and the state
replicated, host augmentation in threads, Orbax checkpoints with exact resume, and a clear stop on a
divergent loss. In a multi-process run each process loads and augments only its rows of each step's
batch (the order and augmentation are functions of the global position, so they do not depend on the
number of processes), and Orbax writes and restores checkpoints on every process together (a
directory every host sees).

- Optimiser: AdamW or SGD with momentum (torch's: weight decay added to the gradient), a linear warm-up
  from 0 and a cosine decay to ``final_lr * lr``, gradient clipping by global norm, weight decay on
  conv/linear kernels only (never BatchNorm scales or biases). Parameters torchvision keeps frozen when
  it trains its detectors (``trainable_backbone_layers=3``: the body's stem and ``layer1``, and every
  FrozenBN) get no update.
- The step's state is ``{params, batch_stats, opt_state, step}``; BatchNorm runs in train mode (torch's
  momentum rule), FrozenBN stays frozen.
- Checkpoints (``orbax.checkpoint.CheckpointManager``: each written to a temporary directory and renamed,
  the last ``keep_checkpoints`` kept) every ``checkpoint_every`` steps hold the state *before* that step,
  saved only once the step's loss (computed from it) is finite. The run's identity (config, student,
  teacher, data) is saved beside it; a run restarted with the same identity resumes from the latest
  checkpoint, and since the data order and augmentation are functions of ``(seed, step)``
  (:mod:`xprune_jax.training.data`) it ends with the parameters an uninterrupted run ends with.
"""

import dataclasses
import math
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from xprune_jax import parallel, runs
from xprune_jax.checkpoint import Model
from xprune_jax.errors import UserError
from xprune_jax.fileio import differences
from xprune_jax.models.layers import BATCH_STATS
from xprune_jax.training import objectives
from xprune_jax.training.data import Augmentation, ExampleLoader, TrainingSet, batches
from xprune_jax.training.teacher import check_teacher, fingerprint

OPTIMIZERS = ("adamw", "sgd")
RESUMABLE_SETTINGS = ("checkpoint_every", "keep_checkpoints", "workers")  # may change between a run and its resume


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    steps: int
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adamw"  # "adamw" | "sgd" (momentum, torch's weight decay)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int | None = None  # None: 5% of the steps
    final_lr: float = 0.01  # the cosine ends at final_lr * lr
    clip_norm: float = 10.0  # 0: no clipping
    objective: objectives.Objective = objectives.Objective()
    augmentation: Augmentation = Augmentation()
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    workers: int = 4  # host threads decoding and augmenting

    def validate(self) -> None:
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1 (got {self.steps})")
        if self.batch_size < 2:
            raise UserError(f"--batch_size must be at least 2 for train-mode BatchNorm (got {self.batch_size})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a positive number (got {self.lr})")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown --optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise UserError("--checkpoint_every and the checkpoints kept must be at least 1")

    @property
    def warmup(self) -> int:
        return min(self.steps - 1, round(0.05 * self.steps) if self.warmup_steps is None else self.warmup_steps)


def schedule(config: FinetuneConfig):
    """Linear warm-up from 0 to ``lr``, then a cosine to ``final_lr * lr`` at ``steps``."""
    if config.warmup > 0:
        return optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup, config.steps, config.final_lr * config.lr)
    return optax.cosine_decay_schedule(config.lr, config.steps, config.final_lr)


def _path_names(path) -> list[str]:
    return [p.key for p in path]


def trainable_labels(arch: str, params: dict) -> dict:
    """``"train"`` or ``"frozen"`` per parameter: torchvision's detectors keep the body's stem and ``layer1``
    (``trainable_backbone_layers=3``) and every FrozenBN (the body's) fixed."""
    def label(path, _):
        names = _path_names(path)
        if arch.startswith(("fasterrcnn", "retinanet")) and names[0] == "backbone.body":
            if names[1] in ("conv1", "bn1") or names[1].startswith("layer1.") or names[-1] in ("scale", "bias"):
                return "frozen"
        return "train"

    return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(params: dict) -> dict:
    """Weight decay on conv and linear kernels only."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _path_names(path)[-1] == "kernel", params)


def make_optimizer(config: FinetuneConfig, arch: str, params: dict) -> optax.GradientTransformation:
    lr, mask = schedule(config), decay_mask(params)
    if config.optimizer == "adamw":
        base = optax.adamw(lr, weight_decay=config.weight_decay, mask=mask)
    else:
        base = optax.chain(optax.add_decayed_weights(config.weight_decay, mask), optax.sgd(lr, momentum=config.momentum))
    if config.clip_norm > 0:
        base = optax.chain(optax.clip_by_global_norm(config.clip_norm), base)
    return optax.multi_transform({"train": base, "frozen": optax.set_to_zero()}, trainable_labels(arch, params))


def make_train_step(student: Model, teacher: Model | None, config: FinetuneConfig, tx, mesh):
    """The jitted ``(state, teacher_variables, batch) -> (state, metrics)``: the batch sharded over ``mesh``,
    the state and the teacher replicated."""
    loss_fn = objectives.objective_loss(objectives.family(student.arch, student.spec),
                                        teacher and objectives.family(teacher.arch, teacher.spec), config.objective)

    def step(state, teacher_variables, batch):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (terms, stats)), grads = grad_fn(state["params"], state[BATCH_STATS], teacher_variables, batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {"params": optax.apply_updates(state["params"], updates), BATCH_STATS: stats,
                     "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **terms}

    replicated, sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(step, in_shardings=(replicated, replicated, sharded), out_shardings=(replicated, replicated))


def _manager(directory: str, config: FinetuneConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _check_features(student_family, teacher_family, student: Model, teacher: Model, batch: dict,
                    objective: objectives.Objective) -> list[str]:
    """The neck levels feature distillation will compare (abstractly traced); none is an error."""
    def features(fam, variables):
        return fam.run(variables, batch, False, None, dataclasses.replace(objective, task=0.0))[0]["features"]

    s = jax.eval_shape(lambda v: features(student_family, v), student.variables)
    t = jax.eval_shape(lambda v: features(teacher_family, v), teacher.variables)
    levels = objectives.feature_levels(s, t)
    if not levels:
        raise UserError("feature distillation finds no neck level of equal width in the model and the teacher (the "
                        "pruned neck is narrower); drop feature= from --objective")
    return levels


def finetune(student: Model, teacher: Model | None, data: TrainingSet, config: FinetuneConfig,
             checkpoint_dir: str | None = None, teacher_record: dict | None = None, mesh=None,
             progress: bool = True, nested: bool = False) -> tuple[Model, dict]:
    """Fine-tune ``student`` on ``data`` under ``config`` (distilling from ``teacher`` where the objective
    says so). With ``checkpoint_dir``, checkpoints go there and a run with the same identity resumes from
    them. ``nested``: the progress bar sits under an outer one (``xprune run``'s) and clears itself when
    done. Returns the fine-tuned model (its ``meta["finetune"]`` lists this run's record after any earlier
    ones) and the record: the teacher, the plan, the objective, the optimiser, the steps, the data, the
    loss history, the final loss and the seconds spent training (over every run a resume continued)."""
    config.validate()
    objective = config.objective
    if objective.needs_teacher:
        if teacher is None:
            raise UserError("distillation needs a teacher: pass --teacher=DIR, or --objective=task to train on labels alone")
        check_teacher(student, teacher)
    if objective.task and not data.labelled:
        raise UserError("the task loss needs labels or ground truth, but the training data has none; give an annotated "
                        "split or a labelled --image_folder, or use --objective=distill")
    if not data.paths:
        raise UserError(f"no training images in {data.root}")
    mesh = mesh or parallel.data_mesh()
    batch_size = parallel.check_batch_size(config.batch_size, mesh)
    rows = parallel.local_rows(batch_size, mesh)
    load = ExampleLoader(student, data, batch_size, config.seed, config.augmentation, with_targets=bool(objective.task))
    levels = []
    if objective.feature:
        example = jax.tree_util.tree_map(lambda *x: np.stack(x), *[load(0, slot) for slot in range(batch_size)])
        levels = _check_features(objectives.family(student.arch, student.spec),
                                 objectives.family(teacher.arch, teacher.spec), student, teacher, example, objective)

    params = student.variables["params"]
    tx = make_optimizer(config, student.arch, params)
    state = parallel.replicate({"params": params, BATCH_STATS: student.variables.get(BATCH_STATS, {}),
                                "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}, mesh)
    teacher_variables = parallel.replicate(teacher.variables if objective.needs_teacher else {}, mesh)
    step_fn = make_train_step(student, teacher if objective.needs_teacher else None, config, tx, mesh)

    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_SETTINGS}
    identity = {"config": json_safe(settings), "batch_size": batch_size,
                "student": fingerprint(student), "teacher": fingerprint(teacher) if objective.needs_teacher else None,
                "data": data.describe()}
    history, window, start_step, manager, seconds_before = [], [], 0, None, 0.0
    if checkpoint_dir:
        manager = _manager(checkpoint_dir, config)
        latest = manager.latest_step()
        if latest is not None:
            restored = manager.restore(latest, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)),
                run=ocp.args.JsonRestore()))
            differ = differences(identity, restored["run"]["identity"])
            if differ:
                raise UserError(f"the checkpoints in {checkpoint_dir} belong to a run with another {', '.join(differ)}; "
                                "remove them, or write this run elsewhere (xprune finetune --out, xprune run "
                                "config.out_dir)")
            state, start_step = restored["state"], latest
            history, window = restored["run"]["history"], restored["run"]["window"]
            seconds_before = restored["run"].get("seconds", 0.0)  # absent from checkpoints of before 2026-12-07

    log_every = max(1, config.steps // 100)
    last_terms, start_time = {}, time.perf_counter()
    bar = tqdm.tqdm(total=config.steps, initial=start_step, unit="step", desc="finetune",
                    position=1 if nested else None, leave=not nested, disable=not (progress and parallel.is_main()))
    try:
        for step, batch in batches(load, start_step, config.steps, config.workers, slots=rows):
            seconds = seconds_before + time.perf_counter() - start_time  # before this step, as the state saved below
            new_state, metrics = step_fn(state, teacher_variables, parallel.global_batch(batch, batch_size, mesh))
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                raise UserError(_divergence(loss, step, manager, checkpoint_dir, config))
            if manager and step > start_step and step % config.checkpoint_every == 0:
                manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), run=ocp.args.JsonSave(
                    {"identity": identity, "history": list(history), "window": list(window),
                     "seconds": seconds})))
            state = new_state
            window.append(loss)
            last_terms = metrics
            if (step + 1) % log_every == 0 or step + 1 == config.steps:
                history.append([step + 1, float(np.mean(window))])
                window = []
            bar.set_postfix(loss=f"{np.mean([h[1] for h in history[-5:]] or [loss]):.4g}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
        if manager:
            manager.wait_until_finished()
            manager.close()

    state = jax.device_get(state)
    variables = {"params": state["params"], **({BATCH_STATS: state[BATCH_STATS]} if state[BATCH_STATS] else {})}
    tail = [loss for _, loss in history[-max(1, len(history) // 10):]]
    record = {
        "teacher": teacher_record if objective.needs_teacher else None,
        "plan": _plan_summary(student),
        "objective": dataclasses.asdict(objective), "feature_levels": levels,
        "optimizer": {"name": config.optimizer, "lr": config.lr, "schedule": "warmup_cosine", "warmup_steps": config.warmup,
                      "final_lr": config.final_lr, "momentum": config.momentum if config.optimizer == "sgd" else None,
                      "weight_decay": config.weight_decay, "clip_norm": config.clip_norm},
        "steps": config.steps, "batch_size": batch_size, "devices": int(mesh.size), "processes": jax.process_count(),
        "seed": config.seed,
        "augmentation": dataclasses.asdict(config.augmentation), "data": data.describe(),
        "resumed_from": start_step or None,
        "final": {"loss": float(np.mean(tail)) if tail else None,  # the mean over the last tenth of the history
                  "last_step": {k: float(v) for k, v in last_terms.items()}},
        "history": history, "seconds": round(seconds_before + time.perf_counter() - start_time, 1),
        "environment": runs.environment(),
    }
    meta = {**student.meta, "finetune": [*student.meta.get("finetune", []), record]}
    return Model(student.arch, student.spec, variables, meta), record


def _divergence(loss: float, step: int, manager, checkpoint_dir: str | None, config: FinetuneConfig) -> str:
    last = None
    if manager:
        manager.wait_until_finished()
        last = manager.latest_step()
    where = (f"the last good checkpoint is step {last} in {checkpoint_dir}" if last is not None
             else "no checkpoint was saved before it")
    return (f"the loss became {loss} at step {step}; {where}; lower --lr (it is {config.lr:g}) or check the data "
            "and the teacher")


def _plan_summary(model: Model) -> dict | None:
    plans = model.meta.get("plans") or []
    if not plans:
        return None
    plan = plans[-1]
    return {k: plan.get(k) for k in ("mode", "budget", "criterion", "flops_before", "flops_after")}


def json_safe(value):
    """Dataclass dicts as JSON values (tuples as lists), so saved and current identities compare equal."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def remove_checkpoints(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
