#!/usr/bin/env bash
# One command on an accelerator host, under 8 minutes: bf16 training images/s and
# utilisation of BiT-R50x1 and EfficientNet-B0 (supervised and SupCon steps, the
# trainer's own), their inference images/s, and the input pipeline on every host core.
#
#   bash benchmarks/accelerator.sh [OUT_DIR]        # tables and JSON into OUT_DIR
#   SMOKE=1 bash benchmarks/accelerator.sh OUT_DIR  # tiny sizes: checks the script on a CPU
#
# Needs JAX for the accelerator, flax, optax, orbax and OpenCV, and cxr_jax's own
# grain and ml_collections; a host without them takes wheels from .whl/ (see
# BENCHMARKS.md, "Accelerator"). TensorFlow is not needed: the training rows use
# host-resident batches (--synthetic_only) and the pipeline rows grain alone.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-/tmp/cxr_jax_accelerator}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/cxr_jax_site .whl/*.whl
  export PYTHONPATH="/tmp/cxr_jax_site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "${SMOKE:-0}" = 1 ]; then
  MODELS=bit-tiny BATCH=4 SIZE=64 STEPS=1 IMAGES=16 PNG_BATCH=8 BATCHES=2
else
  # Batch 256 per step (SupCon: 128 images x 2 views), as large as fits without remat.
  MODELS=bit-r50x1,efficientnet-b0 BATCH=256 SIZE=224 STEPS=10 IMAGES=512 PNG_BATCH=32 BATCHES=24
fi
CORES=$(nproc)

{ nvidia-smi || true; python3 -c "import jax; print(jax.devices())"; } 2>&1 | tee "$OUT_DIR/devices.txt"

echo "== training, bf16 (trainer step vs bare model step)"
timeout 300 python3 benchmarks/train_throughput.py --models "$MODELS" --batch "$BATCH" \
  --image_size "$SIZE" --steps "$STEPS" --rounds 2 --devices 1 --dtype bfloat16 \
  --synthetic_only --json "$OUT_DIR/train.json" | tee "$OUT_DIR/train.md"

echo "== inference and bare forward+backward, bf16"
timeout 90 python3 benchmarks/model_throughput.py --models "$MODELS" --batch_size "$BATCH" \
  --image_size "$SIZE" --dtype bfloat16 --repeats "$STEPS" --json "$OUT_DIR/inference.json" \
  | tee "$OUT_DIR/inference.md"

echo "== input pipeline, $CORES cores"
timeout 150 python3 benchmarks/input_pipeline.py --workers "$CORES" --num_images "$IMAGES" \
  --batch_size "$PNG_BATCH" --num_batches "$BATCHES" --phantoms 0 --grain_only \
  | tee "$OUT_DIR/input.md"
