#!/bin/bash
# One short device lease's checks (issues 7, 8 and 9), about 13 minutes on an H100, in priority
# order, each under its own time limit; logs and JSON go to $OUT (bench/results without it).
#   1. bench/encoder_gpu.py, vit_h: the cases the goals name first (bf16 forms at batch 1
#      and 8, fwd + bwd at batch 4 per remat policy, torch.compile at batch 1, the generator in a
#      fresh process with a cold and a warm cache), then f32 and predict while its budget lasts;
#   2. bench/eval_throughput.py, vit_b: the single point protocol, ours against the official
#      predictor, both on the card;
#   3. bench/train_step.py, vit_h, 4 images x 64 masks x 11 rounds, bf16: the train step's MFU;
#      then 8 images with the decoder over 64 masks at a time (config.decoder_mask_chunk).
# PARTS picks some (default "encoder eval train"): all three take ~13 minutes, over one call's
# 10-minute limit, so run `PARTS=encoder` and `PARTS="eval train"` as two calls back to back (the
# machine stays warm only 30 s after a call).
# The GPU machine's Python lacks a few of the project's packages: bench/fetch_wheels.sh puts them
# in .whl/ here, and run(carry=[".whl"]) takes them there (bench/README.md, "On a GPU machine").
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if compgen -G '.whl/*.whl' >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import jax, flax, torch; print("jax", jax.__version__, "flax", flax.__version__,
  "torch", torch.__version__, jax.devices())'
PARTS=${PARTS:-encoder eval train}
[[ $PARTS == *encoder* ]] && timeout "${ENCODER_S:-420}" python3 bench/encoder_gpu.py --budget "${BUDGET_S:-330}" \
  --compile-batches 1 --train-batches 4 --forms folded,bias,chunked --f32-forms chunked \
  --out "$OUT/encoder_gpu.json" 2>&1 | tee "$OUT/encoder_gpu.log"
[[ $PARTS == *eval* ]] && timeout "${EVAL_S:-200}" python3 bench/eval_throughput.py --threads 0 --images 3 \
  --out "$OUT/eval_throughput.json" 2>&1 | tee "$OUT/eval_throughput.log"
[[ $PARTS == *train* ]] && timeout "${TRAIN_S:-150}" python3 bench/train_step.py --model vit_h --images 4 \
  --out "$OUT/train_step.json" 2>&1 | tee "$OUT/train_step.log"
# The same step at twice the images, the decoder over 64 masks at a time instead of the round remat.
[[ $PARTS == *train* ]] && timeout "${TRAIN_S:-150}" python3 bench/train_step.py --model vit_h --images 8 \
  --mask-chunk 64 --no-round-remat --out "$OUT/train_step_chunks.json" 2>&1 \
  | tee "$OUT/train_step_chunks.log"
