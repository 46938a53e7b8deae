#!/bin/bash
# One short device lease's checks (issues 8 and 9), about 9 minutes on an H100, in priority order,
# each under its own time limit; logs and JSON go to $OUT (bench/results without it).
#   1. bench/encoder_gpu.py, vit_h: the cases the goals name first (bf16 forms at batch 1
#      and 8, fwd + bwd at batch 4 per remat policy, torch.compile at batch 1, the generator in a
#      fresh process with a cold and a warm cache), then f32 and predict while its budget lasts;
#   2. bench/eval_throughput.py, vit_b: the single point protocol, ours against the official
#      predictor, both on the card.
# The GPU machine's Python lacks a few of the project's packages: carry them as wheels in .whl/
# (bench/README.md, "On a GPU machine").
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
timeout "${ENCODER_S:-420}" python3 bench/encoder_gpu.py --budget "${BUDGET_S:-330}" \
  --compile-batches 1 --train-batches 4 --forms folded,bias,chunked --f32-forms chunked \
  --out "$OUT/encoder_gpu.json" 2>&1 | tee "$OUT/encoder_gpu.log"
timeout "${EVAL_S:-120}" python3 bench/eval_throughput.py --threads 0 \
  --out "$OUT/eval_throughput.json" 2>&1 | tee "$OUT/eval_throughput.log"
