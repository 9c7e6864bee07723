"""Weak and strong scaling of `eval` (detection over COCO images) and `score` (the jitted gradient x
activation pass) from 1 to 4 devices, and over 2 processes of 2 devices each (gloo on 127.0.0.1).

On a CPU the devices are forced host devices (``--xla_force_host_platform_device_count``) sharing the same
cores, so this measures the overhead of the data-parallel path (sharding, global arrays, host transfers,
cross-device sums, the gather to process 0), not a speed-up: at equal total work (strong scaling) the ideal
is a ratio of 1.0 to one device; with the work growing with the devices (weak scaling) the ideal time per
image stays constant. The goal: the 4-device path within 10% of the 1-device path at equal total work.

Each cell runs in its own subprocess (XLA_FLAGS are read when jax starts): one untimed pass compiles, then
``--repeats`` timed passes of the whole library call (decode and preprocess in threads, the jitted step, the
results back on the host, gathered to every process). Cells run in ``--rounds`` interleaved rounds;
the median pass is reported. Models have random weights (shapes are what matters here): YOLOv8n at
``--imgsz`` for eval, ShuffleNetV2 x0.5 at ``--crop`` px for score.

    taskset -c 0 python benchmarks/bench_scaling.py --out benchmarks/results/scaling_cpu.json

``--platform gpu`` (or ``tpu``) measures the same two passes on one accelerator instead (the first one: the
1-device cells of strong scaling only, since accelerators can't be forced): the single-device figure of
``benchmarks/run_accelerator.sh``.
"""

import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.bench_common import parser  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def cells(args) -> list[dict]:
    """(command, mode, devices, processes, global batch, images): strong at a fixed batch and image count;
    weak with ``--per_device`` images per device per batch and the images growing with the devices."""
    if args.platform != "cpu":
        return [{"command": command, "mode": "strong", "devices": 1, "processes": 1, "batch": args.batch,
                 "images": args.images} for command in ("eval", "score")]
    out = []
    for command in ("eval", "score"):
        for devices, processes in ((1, 1), (2, 1), (4, 1), (4, 2)):
            out.append({"command": command, "mode": "strong", "devices": devices, "processes": processes,
                        "batch": args.batch, "images": args.images})
        for devices in (1, 2, 4):
            out.append({"command": command, "mode": "weak", "devices": devices, "processes": 1,
                        "batch": args.per_device * devices, "images": args.images // 4 * devices})
    return out


def make_models(directory: str, args) -> None:
    from tests.test_cli_robustness import random_model
    from xprune_jax.checkpoint import save_model
    from xprune_jax.models.shufflenet_v2 import shufflenet_v2_spec
    from xprune_jax.models.yolov8 import yolov8_spec

    save_model(random_model("yolov8n", yolov8_spec("n", 80), {"preprocess": {"imgsz": args.imgsz}, "categories": []}, 0),
               os.path.join(directory, "det"))
    preprocess = {"resize": args.crop + args.crop // 7, "crop": args.crop, "mean": [0.485, 0.456, 0.406],
                  "std": [0.229, 0.224, 0.225]}
    save_model(random_model("shufflenet_v2_x0_5", shufflenet_v2_spec("shufflenet_v2_x0_5", 10),
                            {"preprocess": preprocess, "categories": [str(i) for i in range(10)]}, 0),
               os.path.join(directory, "cls"))


def child(args) -> None:
    """One process of one cell: time the command's passes; process 0 prints them as JSON."""
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(REPO, ".cache", "jax"))
    from xprune_jax import distributed

    flags = (f"127.0.0.1:{args.port}", args.processes, args.process_id) if args.processes > 1 else (None, None, None)
    with distributed.session(*flags, 120.0, "bench", True):
        import numpy as np

        from xprune_jax import parallel
        from xprune_jax.checkpoint import load_model
        from xprune_jax.evaluation.coco import detect, evaluation_images, pipeline_for

        image_dir, _, entries = evaluation_images(args.coco, args.images)
        if len(entries) < args.images:  # the figures are per image: never divide by images not there
            raise SystemExit(f"{args.coco} has {len(entries)} annotated images; --images={args.images} needs that many")
        paths = [os.path.join(image_dir, e["file_name"]) for e in entries]
        if args.command == "eval":
            model = load_model(os.path.join(args.models, "det"))
            forward = jax.jit(pipeline_for(model).forward)
            ids, sizes = [e["id"] for e in entries], [(e["height"], e["width"]) for e in entries]

            def run():
                return detect(model, paths, ids, sizes, args.batch, progress=False, forward=forward)
        else:
            from xprune_jax.attribution.objectives import get_objective
            from xprune_jax.attribution.score import gather_statistics

            model = load_model(os.path.join(args.models, "cls"))
            objective = get_objective("cross_entropy", "classification", model.arch, model.spec)[1]

            def run():
                return gather_statistics(model, paths, objective, args.batch, progress=False)

        start = time.perf_counter()
        run()
        compile_seconds = time.perf_counter() - start
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        if parallel.is_main():
            print(json.dumps({"seconds": seconds, "first_pass_seconds": compile_seconds,
                              "devices": parallel.data_mesh().size, "processes": jax.process_count(),
                              "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
                              "median": float(np.median(seconds))}), flush=True)


def run_processes(script: str, flags: list[str], devices: int, processes: int, pin: bool = False,
                  platform: str = "cpu") -> dict:
    """Run ``script --child FLAGS`` as ``processes`` processes of ``devices // processes`` forced host devices
    each (a coordinator on a free loopback port; with ``pin``, each process on CPUs of its own, as on separate
    hosts), or on another ``platform``, one process on its first device; the JSON line process 0 prints last."""
    env = {**os.environ, "JAX_PLATFORMS": platform, "PYTHONPATH": REPO}
    if platform == "cpu":
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices // processes}"
    elif devices != 1 or processes != 1:
        raise ValueError(f"on {platform}, run one process on one device")
    elif platform in ("cuda", "gpu"):
        env["CUDA_VISIBLE_DEVICES"] = "0"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, script, "--child", *flags, "--processes", str(processes), "--port", str(port)]
    cpus = sorted(os.sched_getaffinity(0))
    own = [cpus[i::processes] for i in range(processes)] if pin else [cpus] * processes
    workers = [subprocess.Popen(command + ["--process_id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=REPO, env=env, preexec_fn=functools.partial(os.sched_setaffinity, 0, own[i]))
               for i in range(processes)]
    outputs = [w.communicate(timeout=1800) for w in workers]
    for w, (_, err) in zip(workers, outputs):
        if w.returncode:
            raise SystemExit(f"{script} {' '.join(flags)} failed:\n{err[-3000:]}")
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def result_record(**fields) -> dict:
    """A results file's content: ``fields`` with the command, the CPUs it ran on, the load after and the
    environment that made them."""
    from xprune_jax import runs

    return {"command": " ".join(sys.argv), "cpu_affinity": sorted(os.sched_getaffinity(0)),
            "load_average_after": os.getloadavg(), **fields, "environment": runs.environment()}


def run_cell(cell: dict, args, models: str) -> dict:
    return run_processes(__file__, ["--command", cell["command"], "--batch", str(cell["batch"]), "--images",
                                    str(cell["images"]), "--repeats", str(args.repeats), "--models", models,
                                    "--coco", args.coco], cell["devices"], cell["processes"], args.pin_processes,
                         args.platform)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", help="results JSON (required; children write nothing)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--images", type=int, default=32, help="strong scaling: images per pass; weak: per 4 devices")
    p.add_argument("--batch", type=int, default=8, help="strong scaling: the global batch")
    p.add_argument("--per_device", type=int, default=2, help="weak scaling: images per device per batch")
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--crop", type=int, default=96)
    p.add_argument("--platform", default="cpu", help="cpu (forced host devices), or gpu / tpu: one accelerator")
    p.add_argument("--pin_processes", action="store_true",
                   help="give each process of a multi-process cell its own share of the CPUs (as separate hosts would)")
    p.add_argument("--child", action="store_true")
    p.add_argument("--command", default="eval")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--models", default="")
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if not args.out:
        p.error("--out is required")
    from xprune_jax.checkpoint import write_json_atomic

    results = {json.dumps(c, sort_keys=True): {**c, "rounds": []} for c in cells(args)}
    with tempfile.TemporaryDirectory() as models:
        make_models(models, args)
        for r in range(args.rounds):
            for key, cell in results.items():
                measured = run_cell({k: cell[k] for k in ("command", "mode", "devices", "processes", "batch", "images")},
                                    args, models)
                cell["rounds"].append(measured)
                print(f"round {r + 1}: {cell['command']} {cell['mode']} {cell['devices']} devices / {cell['processes']} "
                      f"processes, batch {cell['batch']}, {cell['images']} images: {measured['median']:.2f} s",
                      file=sys.stderr, flush=True)
    import numpy as np

    rows = list(results.values())
    for row in rows:
        row["median_seconds"] = float(np.median([s for r in row["rounds"] for s in r["seconds"]]))
        row["ms_per_image"] = 1e3 * row["median_seconds"] / row["images"]
    for row in rows:
        base = next(b for b in rows if b["command"] == row["command"] and b["mode"] == row["mode"] and b["devices"] == 1)
        row["ratio_to_one_device"] = row["ms_per_image"] / base["ms_per_image"]
    summary = {f"{r['command']} {r['devices']} devices / {r['processes']} processes": round(r["ratio_to_one_device"] - 1, 4)
               for r in rows if r["mode"] == "strong" and r["devices"] > 1}
    write_json_atomic(args.out, result_record(overhead_at_equal_work=summary, cells=rows))
    print("| command | scaling | devices | processes | global batch | images | s per pass | ms per image | vs 1 device |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['command']} | {r['mode']} | {r['devices']} | {r['processes']} | {r['batch']} | {r['images']} | "
              f"{r['median_seconds']:.2f} | {r['ms_per_image']:.1f} | {r['ratio_to_one_device']:.3f} |")


if __name__ == "__main__":
    main()
