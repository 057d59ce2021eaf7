#!/usr/bin/env bash
# How daskrecon/data/drunet_small.pt was made, on one lent H200 (issue #28; ~9 min of the GPU).
# Stage 1: four candidate small DRUNets at once for 5.5 min (the kept one: 2 blocks per scale, rate 4e-4);
# stage 2: the kept one alone for 3 min from its weights at half the rate, then the demo's RED/PnP/HQS sweep.
# On a machine without this project's dependencies, wheels for them may sit in .whl/ (see benchmarks/run_on_gpu.sh).
# OUT: where the candidates and logs go (default: a temporary folder); the result replaces the bundled weights.
set -eu
OUT=${OUT:-$(mktemp -d)}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
# IMAGE_CACHE: an .npz of the training images written by train_denoiser.py --image-cache on a machine with
# scikit-learn (the H200's image has it; the shipped weights were trained from such a file).
CACHE=(); [ -n "${IMAGE_CACHE:-}" ] && CACHE=(--image-cache "$IMAGE_CACHE")
train() { tag=$1; shift; python3 scripts/train_denoiser.py --arch drunet --device cuda --batch 32 --patch 128 --bf16 \
  --save-dtype float16 "${CACHE[@]}" --out "$OUT/drunet_$tag.pt" "$@" > "$OUT/log_$tag.txt" 2>&1; }
train a --minutes 5.5 --nc 32 64 128 256 --nb 2 --lr 4e-4 &
train b --minutes 5.5 --nc 32 64 128 256 --nb 2 --lr 1.5e-4 &
train c --minutes 5.5 --nc 32 64 128 256 --nb 1 --lr 4e-4 &
train d --minutes 5.5 --nc 48 96 192 384 --nb 1 --lr 4e-4 &
wait
train a2 --minutes 3 --nc 32 64 128 256 --nb 2 --lr 2e-4 --init "$OUT/drunet_a.pt" --demo-sweep --sweep-iterations 40
echo "candidates and logs in $OUT; the bundled weights: cp $OUT/drunet_a2.pt daskrecon/data/drunet_small.pt"
