"""Where the data-parallel overhead goes, one jitted step at a time (issue 22): the scoring step (gradient x
activation statistics) and the fine-tuning step (forward, backward and SGD update, BatchNorm in train mode),
each timed alone with its inputs already on the devices, for ShuffleNetV2 x0.5 (random weights) at a small size.

* ``score``: on 1 device with the global batch, on 1 device with one device's share of it (what each of D
  devices computes), and on D devices. D x the second is what D forced devices take just running their
  shares one after another on shared cores; the rest of the third is the devices meeting at the all-reduce.
* ``train``: on 1 device, on D devices of one process, and on D devices of 2 processes (gloo on 127.0.0.1),
  with the number of all-reduce ops in the compiled step: train-mode BatchNorm reduces each layer's mean
  and variance over the global batch, forward and backward, so the step synchronises once per op.

Each cell runs in its own subprocess(es) (XLA_FLAGS are read when jax starts), cells in ``--rounds``
interleaved rounds; a cell's figure is the median of ``--repeats`` blocking calls after a compiling one.

    python benchmarks/probe_scaling_step.py --out benchmarks/results/scaling_step_cpu.json
"""

import json
import os
import re
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.bench_common import parser  # noqa: E402
from benchmarks.bench_scaling import make_models, result_record, run_processes  # noqa: E402


def _step(command: str, model, mesh, batch_size: int):
    """The jitted step, its first arguments (placed) and a function of the arguments giving the next ones."""
    import jax.numpy as jnp
    import numpy as np

    from xprune_jax import parallel

    crop = model.meta["preprocess"]["crop"]
    rows = len(parallel.local_rows(batch_size, mesh))
    rng = np.random.default_rng(parallel.local_rows(batch_size, mesh).start)
    batch = parallel.global_batch({"images": rng.normal(size=(rows, crop, crop, 3)).astype(np.float32),
                                   "labels": rng.integers(0, 10, rows).astype(np.int32),
                                   "weights": np.ones(rows, np.float32)}, batch_size, mesh)
    if command == "score":
        from xprune_jax.attribution.objectives import get_objective
        from xprune_jax.attribution.statistics import statistics_step

        objective = get_objective("cross_entropy", "classification", model.arch, model.spec)[1]
        step = statistics_step(model.module, objective, False, mesh)
        return step, (parallel.replicate(model.variables, mesh), batch), lambda args, out: args
    from xprune_jax.training import objectives
    from xprune_jax.training.loop import FinetuneConfig, make_optimizer, make_train_step

    config = FinetuneConfig(steps=1000, batch_size=batch_size, lr=0.01, optimizer="sgd", momentum=0.9,
                            weight_decay=1e-4, warmup_steps=0, clip_norm=0.0,
                            objective=objectives.Objective(distill=0.0, task=1.0))
    tx = make_optimizer(config, model.arch, model.variables["params"])
    state = {"params": model.variables["params"], "batch_stats": model.variables["batch_stats"],
             "opt_state": tx.init(model.variables["params"]), "step": jnp.zeros((), jnp.int32)}
    step = make_train_step(model, None, config, tx, mesh)
    return step, (parallel.replicate(state, mesh), {}, batch), lambda args, out: (out[0], *args[1:])


def child(args) -> None:
    import jax
    import numpy as np

    from xprune_jax import distributed, parallel
    from xprune_jax.checkpoint import load_model

    flags = (f"127.0.0.1:{args.port}", args.processes, args.process_id) if args.processes > 1 else (None, None, None)
    with distributed.session(*flags, 120.0, "bench", True):
        mesh = parallel.data_mesh()
        step, call_args, advance = _step(args.command, load_model(os.path.join(args.models, "cls")), mesh, args.batch)
        hlo = step.lower(*call_args).compile().as_text()
        all_reduces = len(re.findall(r" all-reduce(?:-start)?\(", hlo))
        out = jax.block_until_ready(step(*call_args))
        seconds = []
        for _ in range(args.repeats):
            call_args = advance(call_args, out)
            start = time.perf_counter()
            out = jax.block_until_ready(step(*call_args))
            seconds.append(time.perf_counter() - start)
        if parallel.is_main():
            print(json.dumps({"median_ms": 1e3 * float(np.median(seconds)), "all_reduce_ops": all_reduces}))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", help="results JSON (required)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--crop", type=int, default=96)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--child", action="store_true")
    p.add_argument("--command", default="score")
    p.add_argument("--models", default="")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if not args.out:
        p.error("--out is required")
    import numpy as np

    from xprune_jax.checkpoint import write_json_atomic

    d, b = args.devices, args.batch
    cells = [{"command": "score", "devices": 1, "processes": 1, "batch": b},
             {"command": "score", "devices": 1, "processes": 1, "batch": b // d},
             {"command": "score", "devices": d, "processes": 1, "batch": b},
             {"command": "train", "devices": 1, "processes": 1, "batch": b},
             {"command": "train", "devices": d, "processes": 1, "batch": b},
             {"command": "train", "devices": d, "processes": 2, "batch": b}]
    for cell in cells:
        cell["rounds"] = []
    with tempfile.TemporaryDirectory() as models:
        make_models(models, types.SimpleNamespace(imgsz=160, crop=args.crop))
        for _ in range(args.rounds):
            for cell in cells:
                measured = run_processes(__file__, ["--command", cell["command"], "--models", models, "--batch",
                                                    str(cell["batch"]), "--repeats", str(args.repeats)],
                                         cell["devices"], cell["processes"])
                cell["rounds"].append(measured["median_ms"])
                cell["all_reduce_ops"] = measured["all_reduce_ops"]
                print(f"{cell['command']}: {cell['devices']} devices of {cell['processes']} processes, batch {cell['batch']}: "
                      f"{measured['median_ms']:.1f} ms", file=sys.stderr, flush=True)
    for cell in cells:
        cell["median_ms"] = float(np.median(cell["rounds"]))
        one = next(c for c in cells if c["command"] == cell["command"] and c["devices"] == 1 and c["batch"] == b)
        cell["ratio_to_one_device"] = cell["median_ms"] / one["median_ms"]
    write_json_atomic(args.out, result_record(cells=cells))
    print("| step | devices | processes | global batch | all-reduce ops | ms | vs 1 device, global batch |")
    print("|---|---|---|---|---|---|---|")
    for c in cells:
        print(f"| {c['command']} | {c['devices']} | {c['processes']} | {c['batch']} | {c['all_reduce_ops']} | "
              f"{c['median_ms']:.1f} | {c['ratio_to_one_device']:.2f} |")


if __name__ == "__main__":
    main()
