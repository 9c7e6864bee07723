"""The command-line preamble the benchmark scripts share, and torch's device and precision settings.
No jax or torch at import: ``pin_cpus`` must run before jax starts, since XLA sizes its thread pool
from the CPU affinity.

Every script runs on any backend with the same command: JAX on its default backend, torch on CUDA
when it is available (``--torch_device auto``), each torch call timed up to ``torch.cuda.synchronize``.
``--precision`` sets both sides alike: ``highest`` is full float32 (JAX ``highest`` matmul precision;
torch with TF32 off for convolutions and matmuls), ``default`` each library's default (JAX: TF32 on
recent NVIDIA GPUs; torch: TF32 convolutions, float32 matmuls). On CPU both are float32.
"""

import argparse
import os

COCO_SUBSET = os.environ.get("XPRUNE_COCO_SUBSET",  # as the tests take it
                             os.path.join(os.path.dirname(__file__), "..", "..", "shared", "coco_val2017_subset"))


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the script's first paragraph, with ``--threads`` (CPUs to pin
    to; 0: every CPU the process may use, e.g. under ``taskset``), ``--coco``, ``--seed``,
    ``--precision``, ``--torch_device`` and the R-CNNs' transform sizes (``--min_size``, ``--max_size``)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--coco", default=COCO_SUBSET)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("highest", "default"), default="highest",
                   help="highest: full float32 on both sides; default: each library's default (TF32 on recent GPUs)")
    p.add_argument("--torch_device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--min_size", type=int, default=800, help="the R-CNNs' GeneralizedRCNNTransform min_size (smoke: 256)")
    p.add_argument("--max_size", type=int, default=1333, help="and max_size (smoke: 352)")
    return p


def pin_cpus(threads: int) -> None:
    if threads > 0:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])


def setup(args):
    """The JAX precision and torch's device and precision for ``args``; returns the torch device."""
    import torch

    from xprune_jax import precision

    precision.set_precision(args.precision)
    device = torch.device("cuda" if args.torch_device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.torch_device == "auto" else args.torch_device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        full = args.precision == "highest"
        torch.backends.cudnn.allow_tf32 = not full  # torch's default: True
        torch.backends.cuda.matmul.allow_tf32 = False  # torch's default: False
    return device


def synchronized(fn, device):
    """``fn`` whose call returns once the device's queued work is done (CUDA runs asynchronously)."""
    if device.type != "cuda":
        return fn
    import torch

    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        return out

    return call


def devices(device) -> dict:
    """What ran: JAX's backend and devices, torch's device (and GPU name)."""
    import jax
    import torch

    info = {"jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()],
            "torch_device": str(device)}
    if device.type == "cuda":
        info["torch_gpu"] = torch.cuda.get_device_name(device)
        info["torch_cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        info["torch_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info
