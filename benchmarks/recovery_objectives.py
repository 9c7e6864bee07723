"""Which fine-tuning objective recovers a pruned YOLOv8n best in the recovery tables' budget (125 steps of
16 training images, about one epoch, AdamW at lr 1e-3, BN recalibrated on 256 images first).

    python benchmarks/recovery_objectives.py [--work=DIR]      (the committed JSON: each command on one core)

It runs the `xprune` commands a user would (convert, score, prune, finetune) on the YOLOv8n fixture:
`remove` -30% (every bottleneck removed, the same model for every criterion), `shrink` -30% with
`grad_x_act` (calibration seed 0) and with `random` (seed 1, its weakest recovery in the table), and the
unpruned model itself, each fine-tuned with the objectives below. Finished steps in --work are kept, so a
rerun resumes. Each fine-tuned model's provenance (objective, optimiser, steps, data, final AP on the
validation split) is gathered into benchmarks/results/recovery_objectives/yolov8n.json.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "yolov8n_shapes.pt")
OUT = os.path.join(HERE, "results", "recovery_objectives", "yolov8n.json")
RECIPE = ["--steps=125", "--batch_size=16", "--recalibrate_bn=256"]  # configs/recovery.py's YOLOv8n budget
# (fine-tuned model, pruned model, flags beyond RECIPE)
VARIANTS = [
    ("ft_rm30_distill", "rm30", ["--objective=distill=1"]),
    ("ft_lr3", "rm30", ["--objective=distill=1", "--lr=3e-3"]),
    ("ft_feat", "rm30", ["--objective=distill=1,feature=1"]),
    ("ft_feat5", "rm30", ["--objective=distill=1,feature=5"]),
    ("ft_dtask", "rm30", ["--objective=distill=1,task=1"]),
    ("ft_feattask", "rm30", ["--objective=distill=1,feature=1,task=1"]),
    ("ft_feattask2", "rm30", ["--objective=distill=1,feature=1,task=2"]),
    ("ft_sh30_distill", "sh30", ["--objective=distill=1"]),
    ("ft_sh30_dt", "sh30", ["--objective=distill=1,task=1"]),
    ("ft_sh30r1_distill", "sh30r1", ["--objective=distill=1"]),
    ("ft_sh30r1_dt", "sh30r1", ["--objective=distill=1,task=1"]),
    ("ft_base_dt", "base", ["--objective=distill=1,task=1", "--teacher=base"]),  # the reference: its own teacher
]


def xprune(work: str, out: str, *args: str) -> None:
    """One `xprune` command in ``work`` (skipped where ``out`` exists), its output passed through."""
    if os.path.exists(os.path.join(work, out)):
        return
    print(f"$ xprune {' '.join(args)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "xprune_jax", *args], cwd=work)
    if done.returncode:
        raise SystemExit(f"error: `xprune {' '.join(args)}` failed (exit {done.returncode}); see its output above")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=os.path.expanduser("~/.cache/xprune_jax/recovery_objectives"),
                   help="where the models are made (a rerun resumes there)")
    p.add_argument("--coco", default=os.path.expanduser("~/.cache/xprune_jax/shapes"),
                   help="the shapes detection dataset (`xprune synth`)")
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.coco, "annotations", "instances_train2017.json")):
        print(f"error: no shapes dataset at {args.coco}; make it with `xprune synth --coco=../shared/coco_val2017_subset "
              f"--out={args.coco}` or pass --coco", file=sys.stderr)
        raise SystemExit(2)
    os.makedirs(args.work, exist_ok=True)
    run = lambda out, *a: xprune(args.work, out, *a)  # noqa: E731
    start = time.time()
    run("base", "convert", "--arch=yolov8n", f"--weights={FIXTURE}", "--out=base")
    run("scores.json", "score", "--model=base", f"--coco={args.coco}", "--calib_split=train2017", "--seed=0",
        "--out=scores.json")
    run("scores_r1.json", "score", "--model=base", "--criterion=random", f"--coco={args.coco}", "--calib_split=train2017",
        "--seed=1", "--out=scores_r1.json")
    run("rm30", "prune", "--model=base", "--scores=scores.json", "--mode=remove", "--budget=flops=-30%", "--out=rm30")
    run("sh30", "prune", "--model=base", "--scores=scores.json", "--mode=shrink", "--budget=flops=-30%", "--out=sh30")
    run("sh30r1", "prune", "--model=base", "--scores=scores_r1.json", "--mode=shrink", "--budget=flops=-30%",
        "--out=sh30r1")
    for i, (name, model, flags) in enumerate(VARIANTS):
        print(f"[{i + 1}/{len(VARIANTS)}] {name}, {time.time() - start:.0f} s so far", flush=True)
        run(name, "finetune", f"--model={model}", f"--coco={args.coco}", *RECIPE, *flags, f"--out={name}")
    rows = []
    for name, model, flags in VARIANTS:
        with open(os.path.join(args.work, name, "model.json")) as f:
            meta = json.load(f)
        record = meta["finetune"][-1]
        rows.append({"model": name, "pruned": model, "plan": record.get("plan"), "flags": RECIPE + flags,
                     "objective": record["objective"], "optimizer": record["optimizer"], "steps": record["steps"],
                     "batch_size": record["batch_size"], "seed": record["seed"], "data": record["data"],
                     "AP": record["final"]["metric"]["value"], "validation": record["final"]["metric"]})
    with open(os.path.join(args.work, "base", "model.json")) as f:
        provenance = json.load(f)["provenance"]
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    from xprune_jax.checkpoint import write_json_atomic

    write_json_atomic(OUT, {"fixture": FIXTURE.removeprefix(os.path.dirname(HERE) + "/"), "weights_sha256": provenance["sha256"],
                            "command": "python benchmarks/recovery_objectives.py " + " ".join(sys.argv[1:]), "rows": rows})
    for r in rows:
        print(f"{r['model']:18s} {r['pruned']:7s} {' '.join(r['flags'][3:]):45s} AP {r['AP']:.4f}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
