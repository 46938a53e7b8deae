"""The image encoder's attention forms compiled ahead of time for one TPU chip, from this CPU.

  .venv/bin/python bench/encoder_tpu_compile.py [--model vit_h] [--chip v5p] [--batch 2] \
      [--out bench/results/encoder_tpu_compile.json]

No TPU needed: libtpu's compile-only client (the ``tpu`` extra) compiles the encoder's forward +
backward (bf16 compute, f32 parameters, loss = mean of the embedding) for each form of
``sam_jax.modeling.attention`` and each remat policy, and prints what XLA's TPU compiler reports:
temporaries and total memory per chip, and FLOPs from its cost analysis (which counts each
``lax.scan`` body once, so compare forms with each other, not with an analytic count). The baseline
is the chunked form (the CPU path) in the same run.
This is what ``attention='auto'`` on a TPU is chosen from (``attention.ahead_of_time``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import jax  # noqa: E402

jax.config.update('jax_platforms', 'cpu')  # the target's devices come from libtpu

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from sam_jax.modeling.config import VARIANTS  # noqa: E402
from sam_jax.modeling.sam import Sam  # noqa: E402
from sam_jax.training import topology  # noqa: E402

FORMS = ('chunked', 'folded_xla', 'bias_xla')
GiB = 1 << 30


def compile_one(model: str, form: str, remat: str, batch: int, device) -> dict:
  cfg = VARIANTS[model].replace(dtype='bfloat16', attention=form)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Sam(cfg, rngs=nnx.Rngs(0))).image_encoder)
  sharding = NamedSharding(jax.sharding.Mesh([device], ('x',)), P())
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state)
  s = cfg.image_size
  images = jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32, sharding=sharding)

  def loss(state, images):
    return nnx.merge(graphdef, state)(images, remat=remat).astype(jnp.float32).mean()

  start = time.perf_counter()
  compiled = jax.jit(jax.grad(loss)).lower(state, images).compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  return {'form': form, 'remat': remat, 'batch': batch, 'temp_bytes': mem.temp_size_in_bytes,
          'total_bytes': total, 'xla_flops': float((cost or {}).get('flops', 0.0)),
          'compile_s': round(seconds, 1)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='vit_h')
  parser.add_argument('--chip', default='v5p', choices=('v5p', 'v5e', 'v6e'))
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--remat', default='block,none', help='comma-separated remat policies')
  parser.add_argument('--forms', default=','.join(FORMS))
  parser.add_argument('--out', default='bench/results/encoder_tpu_compile.json')
  args = parser.parse_args()
  shape = '2x2x1' if args.chip == 'v5p' else '2x2'
  device = topology.tpu_devices(f'{args.chip}:{shape}')[0]
  rows = []
  for remat in args.remat.split(','):
    for form in args.forms.split(','):
      row = compile_one(args.model, form, remat, args.batch, device)
      rows.append(row)
      print(f"{form:11s} remat {remat:14s} temporaries {row['temp_bytes'] / GiB:7.2f} GiB  total "
            f"{row['total_bytes'] / GiB:7.2f} GiB  XLA {row['xla_flops'] / 1e12:7.2f} TFLOP  "
            f"(compiled in {row['compile_s']} s)", flush=True)
  print(f'\n{args.model} encoder forward + backward, bf16, batch {args.batch}, one '
        f'{device.device_kind} (compile-only); ratios against chunked with the same remat:\n')
  print('| form | remat | temporaries GiB | x chunked | total GiB | XLA TFLOP | x chunked |')
  print('|---|---|---:|---:|---:|---:|---:|')
  base = {r['remat']: r for r in rows if r['form'] == 'chunked'}
  for r in rows:
    b = base.get(r['remat'])
    ratio = lambda key: f"{r[key] / b[key]:.2f}" if b and b[key] else '-'  # noqa: E731
    print(f"| {r['form']} | {r['remat']} | {r['temp_bytes'] / GiB:.2f} | {ratio('temp_bytes')} | "
          f"{r['total_bytes'] / GiB:.2f} | {r['xla_flops'] / 1e12:.2f} | {ratio('xla_flops')} |")
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'model': args.model, 'chip': device.device_kind, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  main()
