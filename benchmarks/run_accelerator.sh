#!/usr/bin/env bash
# Issue 23: the benchmarks' reduced set for one accelerator (about 9.5 minutes on one GPU), all JSON in
# one folder. Every script runs on any backend with the same command (JAX on its default backend,
# torch on CUDA when available, synchronised); this only picks the settings and the order.
#
#   bash benchmarks/run_accelerator.sh OUT_DIR [--smoke]
#
# Steps, most wanted first, each under its own time limit so that the script ends (and OUT_DIR is
# complete) before a machine's limit; a step cut short keeps what its script had written (each
# writes its JSON after every architecture / batch):
#   postprocess.json        R-CNN post-processing stages, cost analysis + latency, NMS loop vs tiles
#   precision.json          YOLOv8n fixture: AP and latency at highest / default / bfloat16
#   detectors_highest.json  JAX vs torch eager end to end, full float32 on both sides
#   detectors_default.json  the same at each library's default precision (TF32)
#   pruning_detectors.json  pruned / unpruned: network, end to end, end to end with candidates fixed
#   pruning_classifiers.json
#   backbones.json, attribution.json
#   pruning_round_to32.json  ResNet-50 / MobileNetV2 shrink keeping multiples of 32 channels, against
#                            pruning_classifiers.json's 8: the evidence for a per-backend --round_to
#   scaling.json            the library's eval and score passes on one device (issue 22's single-device figure)
# plus run.log. OUT_DIR/accelerator.tar.gz holds them all again (refreshed after every step), for
# machines that return a limited number of files.
#
# Inputs: COCO (default .accel/coco) a folder with val2017/ holding at least eight 640x480 COCO
# images and annotations/instances_val2017.json for them; WHEELS (default .accel/whl) Python wheels installed first if present (the device image lacks
# ultralytics, ultralytics-thop, ml_collections and pycocotools). Make both here, on a CPU machine:
#
#   echo /.accel/ >> .git/info/exclude          # or any ignored folder
#   bash benchmarks/run_accelerator.sh --prepare .accel /path/to/coco_val2017_subset
#
# then on the device (carry the folder): bash benchmarks/run_accelerator.sh "$OUT"
# --smoke: tiny sizes and one round each, to check the script end to end on a CPU (about an hour on a
# loaded 2-core machine). ONLY=name,name runs only those steps (e.g. to redo one that was cut short).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    dest=${2:?usage: run_accelerator.sh --prepare DIR COCO_ROOT}; coco=${3:?usage: run_accelerator.sh --prepare DIR COCO_ROOT}
    mkdir -p "$dest/coco/val2017" "$dest/whl"
    mkdir -p "$dest/coco/annotations"
    python3 - "$coco" "$dest/coco" <<'EOF'
import json, os, shutil, sys
from PIL import Image
source, target = sys.argv[1:]
images = os.path.join(source, "val2017")
picked = [n for n in sorted(os.listdir(images)) if Image.open(os.path.join(images, n)).size == (640, 480)][:10]
for name in picked:
    shutil.copy(os.path.join(images, name), os.path.join(target, "val2017"))
with open(os.path.join(source, "annotations", "instances_val2017.json")) as f:
    full = json.load(f)
kept = [e for e in full["images"] if e["file_name"] in picked]
ids = {e["id"] for e in kept}
with open(os.path.join(target, "annotations", "instances_val2017.json"), "w") as f:
    json.dump({**full, "images": kept, "annotations": [a for a in full["annotations"] if a["image_id"] in ids]}, f)
print(f"copied {len(picked)} 640x480 images and their annotations to {target}")
EOF
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$dest/whl" ultralytics==8.4.190 ultralytics-thop==2.2.3 ml_collections==1.1.0 pycocotools==2.0.11
    du -sh "$dest"
    exit 0
fi

out=${1:?usage: run_accelerator.sh OUT_DIR [--smoke]}
smoke=${2:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)
COCO=${COCO:-.accel/coco}
WHEELS=${WHEELS:-.accel/whl}
log="$out/run.log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# One compilation cache for every step: the same graphs (RetinaNet at batch 8, ...) compile once.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/xprune_accelerator_jax_cache}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/xprune_site \
        "$WHEELS"/*.whl >>"$log" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/xprune_site"
fi
{ date; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.is_available())"
} >>"$log" 2>&1

if [[ "$smoke" == "--smoke" ]]; then  # a CPU check of every step in minutes
    rcnn="--min_size 256 --max_size 352"; b1=1; b8=2; reps="--repeats 1 --warmup 1"; budget=(900 900 900 900 900 900 900 900 900 900)
    classifier_batch=2; detector_batch=1; backbones="--archs shufflenet_v2_x0_5 --batches 1"; eval_images="--max_images 4"
else
    rcnn=""; b1=1; b8=8; reps="--repeats 10 --warmup 2"; budget=(120 45 95 60 65 40 30 25 25 60)
    classifier_batch=64; detector_batch=8; backbones="--archs resnet50,mobilenet_v2,shufflenet_v2_x1_0 --batches 1,64"
    eval_images=""
fi
common="--threads 0 --coco $COCO"
platform=$(python3 -c "import jax; print(jax.default_backend())" 2>/dev/null || echo cpu)  # bench_scaling's devices

step() {  # step SECONDS NAME COMMAND...: run it with a time limit, log it, refresh the archive
    local seconds=$1 name=$2; shift 2
    [[ -n "${ONLY:-}" && ",$ONLY," != *",$name,"* ]] && return
    echo "== $name (limit ${seconds}s): $*" >>"$log"
    local start=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" >>"$log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start))s" >>"$log"
    tar -czf "$out/accelerator.tar.gz.tmp" -C "$out" --exclude='accelerator.tar.gz*' . && \
        mv "$out/accelerator.tar.gz.tmp" "$out/accelerator.tar.gz"
}

step "${budget[0]}" postprocess python3 benchmarks/bench_postprocess.py $common $rcnn --batches $b1,$b8 \
    --whole_batches $b8 $reps --nms_variants loop,tiled:256,tiled:512,tiled:1024,tiled:2048 --out "$out/postprocess.json"
step "${budget[1]}" precision python3 benchmarks/bench_precision.py $common --batch $detector_batch $reps $eval_images \
    --out "$out/precision.json"
step "${budget[2]}" detectors_highest python3 benchmarks/bench_detectors.py $common $rcnn --precision highest \
    --batches $b1,$b8 $reps --throughput_images 0 --out "$out/detectors_highest.json"
step "${budget[3]}" pruning_detectors python3 benchmarks/bench_pruning.py $common $rcnn \
    --archs retinanet_resnet50_fpn,yolov8n --batch $detector_batch --detector_repeats 5 $reps \
    --out "$out/pruning_detectors.json"
step "${budget[4]}" detectors_default python3 benchmarks/bench_detectors.py $common $rcnn --precision default \
    --batches $b1,$b8 $reps --throughput_images 0 --out "$out/detectors_default.json"
step "${budget[5]}" pruning_classifiers python3 benchmarks/bench_pruning.py $common --archs resnet50,mobilenet_v2 \
    --batch $classifier_batch $reps --out "$out/pruning_classifiers.json"
step "${budget[6]}" backbones python3 benchmarks/bench_backbones.py --threads 0 --xla default --jax-variants jit \
    --torch-variants torch $backbones --repeats 10 --min-repeats 3 --max-seconds 5 --out "$out/backbones.json"
step "${budget[7]}" attribution python3 benchmarks/bench_attribution.py $common $rcnn --batch $b8 --repeats 3 \
    --warmup 1 --skip_memory --out "$out/attribution.json"
step "${budget[8]}" pruning_round_to32 python3 benchmarks/bench_pruning.py $common --archs resnet50,mobilenet_v2 \
    --modes shrink --round_to 32 --batch $classifier_batch $reps --out "$out/pruning_round_to32.json"
step "${budget[9]}" scaling python3 benchmarks/bench_scaling.py --platform "$platform" --coco "$COCO" --imgsz 320 \
    --crop 160 --images 8 --batch 8 --rounds 1 --repeats 5 --out "$out/scaling.json"
echo "done $(date)" >>"$log"
ls -la "$out" >>"$log"
