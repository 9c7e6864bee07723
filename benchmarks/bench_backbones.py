"""Issue 2: jitted JAX inference vs torchvision eager on the same CPU, batch and input.

One command runs everything and prints a Markdown table::

    python benchmarks/bench_backbones.py --out benchmarks/results/backbones_cpu.json

Design (the machine may be shared and noisy):

* XLA_FLAGS are read once, when jax starts, so each *XLA flag set* runs in its own worker
  subprocess (``--worker``), with the flags in its environment before jax is imported.
* Inside a worker, for each (arch, batch), every timed callable -- the JAX variants and the torch
  reference (eager, NCHW, ``inference_mode``) and its channels_last variant -- is compiled/warmed up
  first (excluded from timing), then the callables run in a freshly shuffled order in every
  repetition. Each repetition therefore gives one *paired* ratio ``t_jax / t_torch`` taken under the
  same machine load; we report the median latency of each side, the median ratio with its
  interquartile range, and n.
* Every JAX variant's logits are checked against torch on the same input (relative error = max
  abs difference / max abs torch logit). fp32 variants must be < 1e-3 or they are flagged
  ``FAIL`` and never reported as the best; bf16 errors are reported as measured.

* Thread settings (``--threads``, one worker each): ``0`` = library defaults (torch OpenMP and the
  XLA pool both use every core); ``N`` = the worker is pinned to N cpus before jax starts (XLA sizes
  its pool from the affinity) and ``torch.set_num_threads(N)``. On a loaded machine the ``1`` rows
  are the trustworthy ones: torch's OpenMP threads spin at barriers and collapse when a core is
  taken by another process (see ``--omp-wait-policy``).

JAX variants (``--jax-variants``): tokens joined by ``+``, e.g. ``fold+dw+pw+i2c``.

* ``jit``    ``jax.jit(module.apply)(variables, x_nhwc)``, variables as device arguments -- the
             project's path, the baseline.
* ``aot``    compiled ahead of time: ``jax.jit(apply).lower(v, x).compile()``.
* ``const``  variables closed over, i.e. embedded as compile-time constants.
* ``nchw``   takes the NCHW torch-layout input and transposes inside the jit.
* ``donate`` the input buffer is donated (a fresh input per call, made outside the timer).
* ``fold``   BatchNorm folded into the preceding conv at load time (:func:`fold_batch_norm`, a
             pure transform of the variables); each folded BN runs as a per-channel bias add.
* ``dw``     depthwise convs as k*k strided slices times per-channel weights, summed
             (:func:`depthwise_conv_shifted`) instead of ``conv_general_dilated(feature_group_count=C)``.
* ``pw``     1x1 convs as a matmul (``x[:, ::s, ::s] @ kernel[0, 0]``).
* ``i2c``    dense kxk convs with a small output (<= 14x14 pixels, >= 64 input channels) as
             im2col + one matmul (:func:`conv_im2col`).
* ``bf16``   variables and input cast to bfloat16 (logits compared in fp32).

``fold``/``dw``/``pw``/``i2c`` are prototypes of library changes, applied from outside the model
with ``flax.linen.intercept_methods`` (see benchmarks/README.md for the proposed change).

XLA flag sets (``--xla``): names from :data:`XLA_VARIANTS`, or ``--xla-extra NAME=FLAGS``.

Any backend, one command: JAX on its default backend, torch on CUDA when available (``--torch-device``),
each torch call timed to ``torch.cuda.synchronize``; ``--precision`` sets both sides' float32
precision alike (``bench_common``). On a GPU use ``--threads 0`` and ``--xla default`` (the flag sets
are XLA:CPU's).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time

# XLA flag sets, one worker process each. The defaults of this jaxlib route most convolutions to
# YNNPACK ("__ynn_fusion" custom fusions), the rest to Eigen; see benchmarks/README.md.
XLA_VARIANTS = {
    "default": "",
    # convolutions back to XLA's own (Eigen) path instead of YNNPACK:
    "no_ynn_conv": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    # let YNNPACK take whole conv+elementwise(+reduce) subgraphs:
    "ynn_eltwise": "--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce",
    "onednn": "--xla_cpu_use_onednn=true --xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    "fast_runtime": "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME",
    "concurrency_sched": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "xnn_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "vec512": "--xla_cpu_prefer_vector_width=512",
    "single_thread_eigen": "--xla_cpu_multi_thread_eigen=false",
}
JAX_TOKENS = ("jit", "aot", "const", "nchw", "donate", "fold", "dw", "pw", "i2c", "bf16")
TORCH_VARIANTS = ("torch", "torch_cl")  # eager NCHW (the reference) and channels_last
FP32_TOL = 1e-3
DEFAULT_ARCHS = "resnet50,mobilenet_v2,shufflenet_v2_x1_0"


# ----------------------------------------------------------------------------------------------
# BatchNorm folding (prototype of a library transform; only imports jax/flax when called)


def find_conv_bn_pairs(module, variables, x) -> dict[tuple[str, ...], tuple[tuple[str, ...], float]]:
    """``{bn module path: (conv module path, bn epsilon)}`` for every BatchNorm whose input is directly the output
    of a Conv2d, found by tracing the model once (no knowledge of the architecture needed)."""
    import flax.linen as nn
    import jax

    from xprune_jax.models.layers import Conv2d

    pairs, last = {}, {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return out
        if isinstance(context.module, Conv2d):
            last["conv"], last["out"] = tuple(context.module.scope.path), out
        elif isinstance(context.module, nn.BatchNorm) and args and args[0] is last.get("out"):
            pairs[tuple(context.module.scope.path)] = (last["conv"], float(context.module.epsilon))
        return out

    def trace(v, x):
        with nn.intercept_methods(record):
            return module.apply(v, x)

    jax.eval_shape(trace, variables, x)
    return pairs


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def fold_batch_norm(variables: dict, pairs: dict) -> dict:
    """Fold inference BatchNorm into the preceding conv: ``k' = k * s``, ``b' = beta - mean * s`` with
    ``s = gamma / sqrt(var + eps)`` (per output channel, the last HWIO axis; also right for
    depthwise kernels). Computed in float64, stored in float32. The folded BN keeps only
    ``params/bias`` (= b'); its scale and statistics are dropped."""
    import numpy as np

    params = jax_tree_to_numpy(variables["params"])
    stats = jax_tree_to_numpy(variables.get("batch_stats", {}))
    for bn, (conv, eps) in pairs.items():
        p, st = _get(params, bn), _get(stats, bn)
        s = np.asarray(p["scale"], np.float64) / np.sqrt(np.asarray(st["var"], np.float64) + eps)
        conv_p = _get(params, conv)
        if "bias" in conv_p:  # a conv with its own bias: fold it through the BN too
            raise NotImplementedError("conv with bias before BN")
        conv_p["kernel"] = (np.asarray(conv_p["kernel"], np.float64) * s).astype(np.float32)
        bias = np.asarray(p["bias"], np.float64) - np.asarray(st["mean"], np.float64) * s
        _get(params, bn[:-1])[bn[-1]] = {"bias": bias.astype(np.float32)}
        del _get(stats, bn[:-1])[bn[-1]]
    folded = {"params": params}
    if any(_nonempty(stats)):
        folded["batch_stats"] = stats
    return folded


def _nonempty(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _nonempty(v)
    else:
        yield True


def jax_tree_to_numpy(tree):
    import numpy as np

    if isinstance(tree, dict):
        return {k: jax_tree_to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


# ----------------------------------------------------------------------------------------------
# layer rewrites (prototypes of library changes), applied with flax method interceptors


def depthwise_conv_shifted(x, kernel, stride: int, pad: int):
    """Depthwise conv (``groups == C``, kernel ``(kh, kw, 1, C)``) as ``kh * kw`` strided slices of the
    padded input times a per-channel weight, summed: one elementwise loop over NHWC that XLA fuses
    (with the following BN/ReLU). Same arithmetic as the conv, term by term."""
    import jax
    import jax.numpy as jnp

    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else x
    n, h, w, c = xp.shape
    kh, kw = kernel.shape[:2]
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = jax.lax.slice(xp, (0, i, j, 0), (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                                (1, stride, stride, 1)) * kernel[i, j, 0]
            out = tap if out is None else out + tap
    return out


def _out_size(n, k, s, p):
    return (n + 2 * p - k) // s + 1


def conv_im2col(x, kernel, stride: int, pad: int):
    """A dense kxk conv as one matmul over the ``kh * kw`` strided slices concatenated on channels."""
    import jax
    import jax.numpy as jnp

    kh, kw, ci, co = kernel.shape
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else x
    n, h, w, c = xp.shape
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    cols = [jax.lax.slice(xp, (0, i, j, 0), (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                          (1, stride, stride, 1)) for i in range(kh) for j in range(kw)]
    return jnp.concatenate(cols, axis=-1) @ kernel.reshape(kh * kw * ci, co)


def rewritten_apply(module, pairs=None, depthwise=False, pointwise=False, im2col=False,
                    im2col_max_pixels=14 * 14, im2col_min_channels=64):
    """``module.apply`` with, optionally: folded BatchNorms as bias adds (``pairs`` from
    :func:`find_conv_bn_pairs`), depthwise convs as shifted multiply-adds, 1x1 convs as a matmul,
    and small-output dense kxk convs as im2col + matmul. Modules that do not qualify run unchanged."""
    import flax.linen as nn

    from xprune_jax.models.layers import Conv2d

    folded = set(pairs or ())

    def rewrite(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(mod, nn.BatchNorm) and tuple(mod.scope.path) in folded:
            x = args[0]
            return x + mod.get_variable("params", "bias").astype(x.dtype)
        if isinstance(mod, Conv2d) and mod.dilation == 1:
            x = args[0]
            c = x.shape[-1]
            pad = mod.kernel_size // 2 if mod.padding is None else mod.padding
            y = None
            if depthwise and mod.groups == c == mod.features and mod.groups > 1:
                y = depthwise_conv_shifted(x, mod.get_variable("params", "kernel").astype(x.dtype), mod.stride, pad)
            elif pointwise and mod.kernel_size == 1 and pad == 0 and mod.groups == 1:
                xs = x[:, ::mod.stride, ::mod.stride, :] if mod.stride > 1 else x
                y = xs @ mod.get_variable("params", "kernel")[0, 0].astype(x.dtype)
            elif (im2col and mod.kernel_size > 1 and mod.groups == 1 and c >= im2col_min_channels
                  and _out_size(x.shape[1], mod.kernel_size, mod.stride, pad) * _out_size(x.shape[2], mod.kernel_size, mod.stride, pad) <= im2col_max_pixels):
                y = conv_im2col(x, mod.get_variable("params", "kernel").astype(x.dtype), mod.stride, pad)
            if y is not None:
                if mod.use_bias:
                    y = y + mod.get_variable("params", "bias").astype(x.dtype)
                return y
        return next_fun(*args, **kwargs)

    def apply(variables, x):
        with nn.intercept_methods(rewrite):
            return module.apply(variables, x)

    return apply


def build_jax_call(tokens, module, variables, variables_np, pairs, x_nhwc, x_nchw):
    """One timed JAX callable for a variant, e.g. ``{"fold", "dw"}``. Returns (call, prepare, first output)."""
    import jax
    import jax.numpy as jnp

    v, x = variables, x_nhwc
    if "fold" in tokens:
        v = jax.device_put(fold_batch_norm(variables_np, pairs))
    if "bf16" in tokens:
        v = jax.tree.map(lambda a: a.astype(jnp.bfloat16), v)
        x = x.astype(jnp.bfloat16)
    if tokens & {"fold", "dw", "pw", "i2c"}:
        apply = rewritten_apply(module, pairs if "fold" in tokens else None, "dw" in tokens, "pw" in tokens,
                                "i2c" in tokens)
    else:
        apply = module.apply
    if "nchw" in tokens:  # take the torch-layout input and transpose inside the jit
        inner, x = apply, (x_nchw.astype(x.dtype))
        apply = lambda v, x: inner(v, jnp.transpose(x, (0, 2, 3, 1)))  # noqa: E731
    if "const" in tokens:  # variables baked into the executable as constants
        f = jax.jit(lambda x, v=v: apply(v, x))
        if "aot" in tokens:
            f = f.lower(x).compile()
        call = lambda f=f, x=x: f(x)  # noqa: E731
    elif "donate" in tokens:  # the input buffer is donated: give each call a fresh copy (made untimed)
        f = jax.jit(apply, donate_argnums=1)
        fresh = {}

        def prepare(fresh=fresh, x=x):
            fresh["x"] = jnp.array(x, copy=True).block_until_ready()

        def call(f=f, v=v, fresh=fresh):
            return f(v, fresh.pop("x"))

        prepare()
        first = call()
        prepare()
        return call, prepare, first
    else:
        f = jax.jit(apply)
        if "aot" in tokens:
            f = f.lower(v, x).compile()
        call = lambda f=f, v=v, x=x: f(v, x)  # noqa: E731
    return call, None, call()


# ----------------------------------------------------------------------------------------------
# worker: one process, one XLA_FLAGS value


def _now():
    return time.perf_counter()


def run_worker(args) -> dict:
    if args.threads:
        cpus = sorted(os.sched_getaffinity(0))[-args.threads:]
        os.sched_setaffinity(0, cpus)  # before jax starts: XLA sizes its thread pool from this
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import numpy as np
    import torch

    import bench_common
    from converters import mapping, reference
    from xprune_jax import models

    if args.threads:
        torch.set_num_threads(args.threads)
    device = bench_common.setup(args)
    rng = random.Random(args.seed)
    results = []
    for arch in args.archs.split(","):
        spec = models.get_architecture(arch).default_spec()
        module = models.build(arch, spec)
        calibration = torch.from_numpy(
            np.random.default_rng(args.seed).standard_normal((2, 3, 224, 224)).astype(np.float32))
        tv = reference.random_torchvision(arch, calibration, seed=args.seed).eval()
        state = {k: v.numpy() for k, v in tv.state_dict().items()}
        tv.to(device)
        variables_np = mapping.state_dict_to_variables(state, models.variable_shapes(arch, spec), arch)
        variables = jax.device_put(variables_np)
        pairs = None
        for batch in [int(b) for b in args.batches.split(",")]:
            x_np = np.random.default_rng(args.seed + batch).standard_normal((batch, 3, 224, 224)).astype(np.float32)
            x_t = torch.from_numpy(x_np).to(device)
            x_nhwc = jax.device_put(np.ascontiguousarray(x_np.transpose(0, 2, 3, 1)))
            x_nchw = jax.device_put(x_np)
            with torch.inference_mode():
                want = tv(x_t).cpu().numpy()
            calls, meta = {}, {}

            # torch side
            @functools.partial(bench_common.synchronized, device=device)
            def torch_call(model=tv, x=x_t):
                with torch.inference_mode():
                    return model(x)

            calls["torch"] = torch_call
            if "torch_cl" in args.torch_variants:
                tv_cl = reference.random_torchvision(arch, calibration, seed=args.seed).eval()
                tv_cl = tv_cl.to(device, memory_format=torch.channels_last)
                x_cl = x_t.contiguous(memory_format=torch.channels_last)

                @functools.partial(bench_common.synchronized, device=device)
                def torch_cl_call(model=tv_cl, x=x_cl):
                    with torch.inference_mode():
                        return model(x)

                calls["torch_cl"] = torch_cl_call
                with torch.inference_mode():
                    meta["torch_cl"] = {"rel_err": reference.relative_error(tv_cl(x_cl).cpu().numpy(), want)}

            # JAX side
            for name in args.jax_variants.split(","):
                t0 = _now()
                tokens = set(name.split("+"))
                if tokens - set(JAX_TOKENS):
                    raise SystemExit(f"unknown JAX variant {name!r}: tokens are {', '.join(JAX_TOKENS)}, joined by '+'")
                if "fold" in tokens and pairs is None:
                    pairs = find_conv_bn_pairs(module, variables, x_nhwc)
                call, prepare, out = build_jax_call(tokens, module, variables, variables_np, pairs, x_nhwc, x_nchw)
                out = np.asarray(jax.block_until_ready(out), np.float32)
                err = reference.relative_error(out, want)
                m = meta.setdefault(name, {})
                m.update(first_call_s=_now() - t0, rel_err=err,
                         ok=bool(err < FP32_TOL) if "bf16" not in tokens else None)
                if prepare is not None:
                    m["prepare"] = prepare
                calls[name] = call

            # warm-up, then paired repetitions in random order
            names = list(calls)
            for _ in range(args.warmup):
                for n in names:
                    if "prepare" in meta.get(n, {}):
                        meta[n]["prepare"]()
                    jax.block_until_ready(calls[n]())
            times = {n: [] for n in names}
            cpu = {n: [] for n in names}
            loads = [os.getloadavg()[0]]
            start, reps = _now(), 0
            gc.collect()
            gc.disable()
            try:
                while reps < args.repeats:
                    if reps >= args.min_repeats and _now() - start > args.max_seconds:
                        break
                    order = names[:]
                    rng.shuffle(order)
                    for n in order:
                        if "prepare" in meta.get(n, {}):
                            meta[n]["prepare"]()
                        p0, t0 = time.process_time(), _now()
                        jax.block_until_ready(calls[n]())
                        times[n].append(_now() - t0)
                        cpu[n].append(time.process_time() - p0)
                    reps += 1
            finally:
                gc.enable()
            loads.append(os.getloadavg()[0])
            entry = {"arch": arch, "batch": batch, "n": reps, "loadavg_1min": loads,
                     "seconds": _now() - start, "variants": {}}
            for n in names:
                m = {k: v for k, v in meta.get(n, {}).items() if k != "prepare"}
                entry["variants"][n] = {**m, "times_s": times[n], "cpu_s": cpu[n]}
            results.append(entry)
            print(f"  [{args.xla_name}] {arch} b{batch}: n={reps} in {entry['seconds']:.0f}s "
                  f"load {loads[0]:.1f}->{loads[1]:.1f}", file=sys.stderr, flush=True)
    return {"xla_name": args.xla_name, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "threads": args.threads, "affinity": sorted(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), **bench_common.devices(device), "precision": args.precision,
            "results": results}


# ----------------------------------------------------------------------------------------------
# driver


def _quantiles(xs):
    import numpy as np

    return [float(np.percentile(xs, q)) for q in (25, 50, 75)]


def summarise(worker_out: list[dict]) -> list[dict]:
    import numpy as np

    rows = []
    for w in worker_out:
        for e in w["results"]:
            t_ref = np.asarray(e["variants"]["torch"]["times_s"])
            t_cl = e["variants"].get("torch_cl", {}).get("times_s")
            for name, v in e["variants"].items():
                if name == "torch":
                    continue
                t = np.asarray(v["times_s"])
                q1, med, q3 = _quantiles(t / t_ref)
                cl = _quantiles(t / np.asarray(t_cl)) if t_cl and name != "torch_cl" else None
                rows.append({
                    "threads": w["threads"], "torch_threads": w["torch_threads"],
                    "xla": w["xla_name"], "arch": e["arch"], "batch": e["batch"], "variant": name,
                    "n": int(e["n"]), "torch_ms": float(np.median(t_ref) * 1e3),
                    "ms": float(np.median(t) * 1e3), "min_ms": float(t.min() * 1e3),
                    "torch_min_ms": float(t_ref.min() * 1e3),
                    "ratio_median": med, "ratio_q1": q1, "ratio_q3": q3,
                    "ratio_vs_torch_cl": None if cl is None else {"q1": cl[0], "median": cl[1], "q3": cl[2]},
                    "cpu_per_call_ms": float(np.median(v["cpu_s"]) * 1e3),
                    "rel_err": v.get("rel_err"), "ok": v.get("ok"),
                })
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| threads | arch | batch | XLA flags | variant | torch ms | JAX ms | ratio JAX/torch (median [IQR]) | n | rel err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = "" if r["rel_err"] is None else f"{r['rel_err']:.1e}" + (" FAIL" if r["ok"] is False else "")
        lines.append(f"| {_threads(r)} | {r['arch']} | {r['batch']} | {r['xla']} | {r['variant']} | {r['torch_ms']:.1f} | "
                     f"{r['ms']:.1f} | **{r['ratio_median']:.2f}** [{r['ratio_q1']:.2f}, {r['ratio_q3']:.2f}] | "
                     f"{r['n']} | {err} |")
    return "\n".join(lines)


def _threads(r):
    return r["threads"] or f"default ({r['torch_threads']})"


def headline(rows: list[dict], variant: str) -> str:
    """Per (threads, arch, batch): the baseline (default XLA flags, ``jit``) and ``variant`` (default
    flags), each as JAX/torch-eager-NCHW paired ratios."""
    lines = ["| threads | arch | batch | torch eager ms | JAX `jit` ms | ratio [IQR] | JAX `" + variant + "` ms | ratio [IQR] "
             "| same vs torch channels_last [IQR] | n |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["threads"], r["arch"], r["batch"]) for r in rows})
    for threads, arch, batch in keys:
        rs = [r for r in rows if (r["threads"], r["arch"], r["batch"]) == (threads, arch, batch) and r["xla"] == "default"]
        cells = []
        for name in ("jit", variant):
            r = next((r for r in rs if r["variant"] == name), None)
            bad = " FAIL" if r and r["ok"] is False else ""
            cells.append(f"{r['ms']:.1f} | **{r['ratio_median']:.2f}** [{r['ratio_q1']:.2f}, {r['ratio_q3']:.2f}]{bad}"
                         if r else "- | -")
        ref = next(iter(rs), None)
        if ref is None:
            continue
        best = next((r for r in rs if r["variant"] == variant), None)
        cl = best and best["ratio_vs_torch_cl"]
        cl = f"{cl['median']:.2f} [{cl['q1']:.2f}, {cl['q3']:.2f}]" if cl else "-"
        lines.append(f"| {_threads(ref)} | {arch} | {batch} | {ref['torch_ms']:.1f} | {cells[0]} | {cells[1]} | {cl} | {ref['n']} |")
    return "\n".join(lines)


def environment() -> dict:
    import importlib.metadata as md

    def ver(p):
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return None

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lscpu = ""
    info = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    return {
        "python": platform.python_version(), "platform": platform.platform(),
        "versions": {p: ver(p) for p in ("jax", "jaxlib", "flax", "torch", "torchvision", "numpy")},
        "cpu_model": info.get("Model name"), "cpus": info.get("CPU(s)"),
        "cores_per_socket": info.get("Core(s) per socket"), "threads_per_core": info.get("Thread(s) per core"),
        "sockets": info.get("Socket(s)"), "flags_avx512": "avx512f" in info.get("Flags", ""),
        "avx512_bf16": "avx512_bf16" in info.get("Flags", ""),
        "nproc_affinity": len(os.sched_getaffinity(0)), "loadavg_start": os.getloadavg(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS")},
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--archs", default=DEFAULT_ARCHS)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--xla", default="default",
                   help=f"comma-separated XLA flag sets, each in its own process; names: {', '.join(XLA_VARIANTS)}; "
                        "or NAME=--raw --flags (then give only one per --xla-extra)")
    p.add_argument("--xla-extra", action="append", default=[], help="NAME=XLA_FLAGS, an extra flag set (repeatable)")
    p.add_argument("--jax-variants", default="jit,dw,fold+dw+pw+i2c",
                   help=f"comma-separated; each is tokens joined by '+' from: {', '.join(JAX_TOKENS)}")
    p.add_argument("--headline-variant", default="fold+dw+pw+i2c")
    p.add_argument("--torch-variants", default="torch,torch_cl")
    p.add_argument("--repeats", type=int, default=30, help="max paired repetitions per (arch, batch)")
    p.add_argument("--min-repeats", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=10.0,
                   help="stop repeating after this long per (arch, batch) once --min-repeats are done")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", default="0,1",
                   help="comma-separated thread settings, one worker each: 0 = library defaults (torch and XLA "
                        "use every core); N = pin the worker to N cpus (XLA sizes its pool from the affinity) "
                        "and torch.set_num_threads(N)")
    p.add_argument("--omp-wait-policy", default=None, choices=["PASSIVE", "ACTIVE"],
                   help="OMP_WAIT_POLICY for the workers (torch's OpenMP); default: leave unset (torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("highest", "default"), default="highest",
                   help="highest: full float32 on both sides; default: each library's default (TF32 on recent GPUs)")
    p.add_argument("--torch-device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--xla-name", default="default", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:  # child: XLA_FLAGS already in the environment
        args.threads = int(args.threads)
        out = run_worker(args)
        with open(args.worker, "w") as fh:
            json.dump(out, fh)
        return

    flag_sets = []
    for name in [n for n in args.xla.split(",") if n]:
        if name not in XLA_VARIANTS:
            raise SystemExit(f"unknown --xla {name!r}; choose from {', '.join(XLA_VARIANTS)} or use --xla-extra")
        flag_sets.append((name, XLA_VARIANTS[name]))
    for extra in args.xla_extra:
        name, _, flags = extra.partition("=")
        flag_sets.append((name, flags))

    env_info = environment()
    t_start = time.time()
    workers = []
    for threads in [int(t) for t in args.threads.split(",")]:
        for name, flags in flag_sets:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
                path = fh.name
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--xla-name", name,
                   "--archs", args.archs, "--batches", args.batches, "--jax-variants", args.jax_variants,
                   "--torch-variants", args.torch_variants, "--repeats", str(args.repeats),
                   "--min-repeats", str(args.min_repeats), "--max-seconds", str(args.max_seconds),
                   "--warmup", str(args.warmup), "--threads", str(threads), "--seed", str(args.seed),
                   "--precision", args.precision, "--torch-device", args.torch_device]
            env = dict(os.environ, XLA_FLAGS=flags)
            env.setdefault("PYTHONWARNINGS", "ignore")
            if args.omp_wait_policy:
                env["OMP_WAIT_POLICY"] = args.omp_wait_policy
            print(f"[{name}, threads={threads or 'default'}] XLA_FLAGS={flags!r}", file=sys.stderr, flush=True)
            t0 = time.time()
            subprocess.run(cmd, env=env, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            with open(path) as fh:
                w = json.load(fh)
            os.unlink(path)
            w["wall_s"] = time.time() - t0
            w["omp_wait_policy"] = env.get("OMP_WAIT_POLICY")
            workers.append(w)

    rows = summarise(workers)
    table, head = markdown(rows), headline(rows, args.headline_variant)
    print(f"\n## Headline (ratio = JAX / torch eager NCHW, < 1: JAX faster; goal <= 0.8)\n\n{head}\n\n## All variants\n\n{table}\n")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        record = {
            "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), "cwd": os.getcwd(),
            "seed": args.seed, "args": vars(args), "environment": env_info,
            "loadavg_end": os.getloadavg(), "wall_s": time.time() - t_start,
            "ratio": "t_jax / t_torch(eager NCHW, inference_mode), per paired repetition",
            "workers": workers, "summary": rows, "markdown_headline": head, "markdown": table,
        }
        with open(args.out, "w") as fh:
            json.dump(record, fh, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
