"""One process of tests/test_scale.py's runs: ``python tests/scale_worker.py WORK OUT NAMES [FLAG ...]`` runs the
named xprune commands (comma-separated names of :func:`commands`) in this process through ``cli.invoke``, each
with the extra flags (the multi-process ones), then prints one JSON line: each command's exit status and
stderr. With ``--xla_force_host_platform_device_count`` in XLA_FLAGS it is a many-device run."""

import contextlib
import io
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAPES_TRAIN = REPO / "xprune_jax" / "data" / "demo_shapes" / "classification" / "train"


def commands(work: pathlib.Path, out: pathlib.Path) -> dict[str, list[str]]:
    """The runs compared across device and process counts: a tiny classifier's scores (grad_x_act and the
    Taylor weight criterion), predictions and a few fine-tuning steps, and a detector's evaluation (YOLOv8n at
    64 px on real COCO images); ``bad_batch`` must fail on 4 devices."""
    return {
        "score": ["score", f"--model={work / 'cls'}", f"--coco={work / 'coco'}", "--calib_split=val2017",
                  "--calib_images=8", "--batch_size=4", "--criterion=grad_x_act,taylor_weight",
                  f"--out={out / 'scores.json'}"],
        "eval": ["eval", f"--model={work / 'det'}", f"--coco={work / 'coco'}", "--batch_size=4", f"--out={out / 'eval'}"],
        "predict": ["predict", f"--model={work / 'cls'}", f"--images={work / 'coco' / 'val2017'}", "--batch_size=4",
                    f"--out={out / 'predict.npz'}"],
        "finetune": ["finetune", f"--model={work / 'cls'}", f"--image_folder={SHAPES_TRAIN}", "--steps=3", "--batch_size=8",
                     "--lr=0.001", "--optimizer=sgd", "--objective=task", "--checkpoint_every=2", f"--out={out / 'finetune'}"],
        "bad_batch": ["eval", f"--model={work / 'det'}", f"--coco={work / 'coco'}", "--batch_size=6",
                      f"--out={out / 'bad_batch'}"],
    }


def main() -> None:
    work, out, names, extra = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3].split(","), sys.argv[4:]
    sys.path.insert(0, str(REPO))
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py sets it for the reference
    from xprune_jax import cli

    results = {}
    for name in names:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            code = cli.invoke(["xprune", *commands(work, out)[name], f"--cache_dir={REPO / '.cache' / 'jax'}", *extra])
        results[name] = {"code": code, "stderr": stderr.getvalue()}
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
