"""The full SAM train step (images x 64 masks x 11 prompt rounds): images/s, model FLOP utilisation,
peak memory per device, and what the prompt rounds cost next to the image encoder.

  .venv/bin/python bench/train_step.py --model vit_b --images 1 --mask-chunk 16   # CPU, ~25 min
  python bench/train_step.py --model vit_h --images 4 --dtype bfloat16     # one GPU

The step is the real one (``sam_jax.training.loop.setup`` with the paper's config for the model)
on synthetic batches (random images, elliptical masks, a point or box per mask), so the data extra
is not needed. Baseline measured in the same run: the image encoder's forward + backward alone
(same dtype, remat policy and batch); the ratio step / encoder is the cost of the 11 rounds of
prompt encoder + mask decoder over every mask. Prints a table last and writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sam_jax.training import loop, metrics  # noqa: E402
from sam_jax.training.config import RECIPES, paper_config  # noqa: E402


def synthetic_batch(spec: dict[str, jax.ShapeDtypeStruct], seed: int = 0) -> dict[str, np.ndarray]:
  """A batch of the pipeline's layout: noise images, one random ellipse per mask slot, its first
  prompt a point inside it or its box (alternating)."""
  rng = np.random.default_rng(seed)
  b, s = spec['image'].shape[:2]
  m, low = spec['masks'].shape[1:3]
  scale = s / low
  yy, xx = np.mgrid[:low, :low]
  cy, cx = rng.uniform(0.2, 0.8, (2, b, m)) * low
  ry, rx = rng.uniform(0.05, 0.25, (2, b, m)) * low
  masks = ((yy - cy[..., None, None]) / ry[..., None, None]) ** 2 + \
          ((xx - cx[..., None, None]) / rx[..., None, None]) ** 2 <= 1  # (B, M, L, L)
  boxes = np.stack([cx - rx, cy - ry, cx + rx, cy + ry], -1).clip(0, low - 1) * scale
  points = np.stack([cx, cy], -1) * scale  # the centre: inside the ellipse
  is_point = (np.arange(m) % 2 == 0)[None, :, None]
  coords = np.where(is_point[..., None], np.stack([points, np.zeros_like(points)], 2),
                    boxes.reshape(b, m, 2, 2))
  labels = np.where(is_point, np.array([1, -1]), np.array([2, 3]))
  labels = np.broadcast_to(labels, (b, m, 2)).astype(np.int32)
  image = rng.integers(1, 256, spec['image'].shape).astype(spec['image'].dtype)
  return {
      'image': image, 'input_size': np.full((b, 2), s, np.int32),
      'original_size': np.full((b, 2), s, np.int32), 'image_id': np.arange(b, dtype=np.int32),
      'masks': masks, 'mask_valid': np.ones((b, m), bool), 'prompt_coords': coords.astype(np.float32),
      'prompt_labels': labels, 'gt_boxes': boxes.astype(np.float32),
  }


def peak_memory_bytes() -> tuple[float, str]:
  """Peak bytes of device 0 (accelerators), else the process's peak resident set (CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return float(stats['peak_bytes_in_use']), 'device peak'
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0, 'process peak RSS'


def timed(fn, *args, repeats: int) -> float:
  """Best-of-``repeats`` seconds of fn(*args) (outputs blocked on)."""
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='vit_b')
  p.add_argument('--images', type=int, default=1, help='images per device')
  p.add_argument('--masks', type=int, default=64)
  p.add_argument('--rounds', type=int, default=11)
  p.add_argument('--dtype', default=None, help='compute dtype (default: bfloat16 on GPU/TPU, '
                 'float32 on CPU)')
  p.add_argument('--remat', default='block')
  p.add_argument('--no-round-remat', action='store_true')
  p.add_argument('--mask-chunk', type=int, default=0,
                 help='config.decoder_mask_chunk: masks per decoder pass (0: all)')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--out', default='bench/results/train_step.json')
  args = p.parse_args(argv)

  on_cpu = jax.devices()[0].platform == 'cpu'
  config = paper_config(args.model if args.model in RECIPES else 'vit_b')
  config.model = args.model
  config.model_dtype = args.dtype or ('float32' if on_cpu else 'bfloat16')
  config.data.image_size = 256 if args.model == 'vit_tiny' else 1024
  config.global_batch_size = 0  # the batch is per device here
  config.data.batch_size = args.images * jax.local_device_count()
  config.data.max_masks = args.masks
  config.num_rounds = args.rounds
  config.remat = args.remat
  config.round_remat = not args.no_round_remat
  config.decoder_mask_chunk = args.mask_chunk
  t = loop.setup(config)

  t0 = time.perf_counter()
  step = t.jitted_step().lower(t.abstract_state, t.batch_spec).compile()
  compile_s = time.perf_counter() - t0
  mem = step.memory_analysis()
  flops = loop.model_flops_per_step(t)
  state = t.init_state()
  batch = loop.global_batch(synthetic_batch(t.batch_spec), t.batch_shardings)
  for _ in range(2):  # warm up; the state is donated, so thread it through
    state, m = step(state, batch)
  jax.block_until_ready(m)
  best = float('inf')
  for _ in range(args.repeats):
    t1 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    best = min(best, time.perf_counter() - t1)
  loss = float(m['loss'])

  # Baseline: the encoder's forward + backward alone, same remat policy and dtype.
  params = state['params']
  frozen = state['frozen']
  images = batch['image']

  def encoder_loss(params, frozen, images):
    model = nnx.merge(t.graphdef, params, frozen)
    x = images.astype(jnp.float32) / 255.0
    return model.image_encoder(x, remat=config.remat).astype(jnp.float32).mean()

  enc = jax.jit(jax.grad(encoder_loss)).lower(params, frozen, images).compile()
  enc_s = timed(enc, params, frozen, images, repeats=args.repeats)
  enc_flops = 3.0 * metrics.encoder_flops(t.model_config) * images.shape[0]
  peak, peak_kind = peak_memory_bytes()

  n_dev = jax.device_count()
  peak_flops = metrics.peak_flops() * n_dev
  images_total = config.data.batch_size * jax.process_count()
  result = {
      'device': jax.devices()[0].device_kind, 'devices': n_dev, 'model': args.model,
      'dtype': config.model_dtype, 'images_per_device': args.images, 'masks': args.masks,
      'rounds': args.rounds, 'remat': args.remat, 'round_remat': config.round_remat,
      'mask_chunk': args.mask_chunk,
      'compile_s': round(compile_s, 1), 'step_s': best, 'images_per_s': images_total / best,
      'model_flops_per_step': flops, 'mfu': flops / best / peak_flops,
      'encoder_fwd_bwd_s': enc_s, 'encoder_flops': enc_flops,
      'encoder_mfu': enc_flops / enc_s / peak_flops,
      'step_over_encoder': best / enc_s, 'decoder_share_of_time': 1 - enc_s / best,
      'decoder_share_of_flops': 1 - enc_flops / flops,
      'argument_gib': mem.argument_size_in_bytes / 2**30 if mem else None,
      'temp_gib': mem.temp_size_in_bytes / 2**30 if mem else None,
      'peak_gib': peak / 2**30, 'peak_kind': peak_kind, 'loss': loss,
  }
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)
  print(f'\ntrain step, {args.model} {config.model_dtype}, {args.images} image(s) x {args.masks} '
        f'masks x {args.rounds} rounds per device, {n_dev} {result["device"]}, remat '
        f'{args.remat}, round remat {config.round_remat}, masks per decoder pass '
        f'{args.mask_chunk or args.masks * args.images}')
  rows = [
      ('step time', f'{best * 1e3:.1f} ms', f'compile {compile_s:.0f} s'),
      ('images / s', f'{result["images_per_s"]:.3g}', ''),
      ('model FLOP utilisation', f'{result["mfu"] * 100:.1f} %',
       f'{flops / 1e12:.2f} TFLOP per step'),
      ('encoder fwd + bwd alone', f'{enc_s * 1e3:.1f} ms',
       f'MFU {result["encoder_mfu"] * 100:.1f} %, {enc_flops / 1e12:.2f} TFLOP'),
      ('step / encoder (ratio)', f'{result["step_over_encoder"]:.2f}x',
       f'prompt rounds: {result["decoder_share_of_time"] * 100:.0f} % of the time, '
       f'{result["decoder_share_of_flops"] * 100:.0f} % of the FLOPs'),
      ('memory per device', f'{result["peak_gib"]:.2f} GiB {peak_kind}',
       f'XLA: arguments {result["argument_gib"]:.2f} GiB, temporaries {result["temp_gib"]:.2f} GiB'),
  ]
  for name, value, note in rows:
    print(f'  {name:<26} {value:>16}   {note}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
