"""Throughput of the single point protocol: ours against the official predictor, in one run.

  .venv/bin/python bench/eval_throughput.py [--model vit_b] [--images 4] [--image-size 1024]
                                            [--threads 2] [--out bench/results/eval_throughput.json]

Both run the same protocol (``sam_jax.evaluation.single_point``: centre first click, 9 clicks, the
previous logits fed back) on the same random weights (the official model with every tensor random,
saved to a .pth that ours loads) and the same synthetic-shapes images rendered at --image-size:

  ours      ``single_point.evaluate_source``: one image encode, then each click round of all the
            image's masks through the decoder in one batch, IoU on the device;
  official  ``tests/official_reference.ref_protocol``: the official ``SamPredictor``, one
            ``predict`` call per mask and click, IoU and distance transforms in numpy.

Prints images/s and prompts/s (a prompt: one decoder call's worth for one mask, i.e. one click),
the ratio ours/official (goal >= 3x), the share of the time spent encoding (timed apart), and how far
the two mIoUs differ at each click count (they run the same clicks: ~1e-6 in float32). Our compile
is excluded (a warm-up pass over the images first, printed apart): a one-off per image size bucket
and batch size. Ours and the official alternate image by image, so that load from elsewhere on the
machine hits both alike. Where jax runs on a GPU and torch has CUDA, the official model runs on the
card too (``--threads 0`` then leaves every CPU core to both).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'tests'))

GOAL = 3.0
NUM_POINTS = 9


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='vit_b')
  parser.add_argument('--images', type=int, default=4)
  parser.add_argument('--image-size', type=int, default=1024)
  parser.add_argument('--threads', type=int, default=2, help='CPU cores (0: all)')
  parser.add_argument('--out', default=os.path.join(REPO, 'bench', 'results',
                                                    'eval_throughput.json'))
  args = parser.parse_args()
  from encoder_cpu import restrict_threads
  args.threads = args.threads or len(os.sched_getaffinity(0))
  threads_note = restrict_threads(args.threads)

  import numpy as np
  import torch
  import torchvision_shim  # the official package imports torchvision
  torchvision_shim.install()
  from official_reference import official_sam, ref_protocol, save_pth
  from PIL import Image
  from pycocotools import mask as mask_utils
  from segment_anything import SamPredictor as OfficialPredictor

  import jax
  from sam_jax import SamPredictor, sam_model_registry
  from sam_jax.data import synthetic_shapes
  from sam_jax.evaluation import single_point
  from sam_jax.modeling.config import VARIANTS
  torch.set_num_threads(args.threads)

  spec = synthetic_shapes.ShapesSpec(image_size=args.image_size)
  records = [synthetic_shapes.to_record(synthetic_shapes.render(11, i, spec), image_id=i)
             for i in range(args.images)]
  images = [np.asarray(Image.open(io.BytesIO(r['image'])).convert('RGB')) for r in records]
  gts = [[mask_utils.decode({'size': m['size'].tolist(), 'counts': m['counts'].encode()})
          .astype(bool) for m in r['masks']] for r in records]
  n_masks = sum(map(len, gts))

  with tempfile.TemporaryDirectory() as tmp:
    torch_sam = official_sam(VARIANTS[args.model], seed=1)
    ours = sam_model_registry[args.model](checkpoint=save_pth(torch_sam, f'{tmp}/m.pth'))
  # On a GPU machine both run on the card: ours where jax puts it, the official on CUDA.
  torch_device = 'cuda' if jax.default_backend() == 'gpu' and torch.cuda.is_available() else 'cpu'
  torch_sam.to(torch_device)
  sync = torch.cuda.synchronize if torch_device == 'cuda' else (lambda: None)
  predictor, official = SamPredictor(ours), OfficialPredictor(torch_sam)
  protocol = single_point.Protocol(num_points=NUM_POINTS, first_points=('center',))

  t = time.perf_counter()  # compiles every shape the timed run meets (image size buckets, batches)
  single_point.evaluate_source(predictor, records, protocol, progress=False)
  compile_s = time.perf_counter() - t

  # Image by image, ours then the official, so that load from elsewhere hits both alike; the
  # encoders again afterwards, alone, to show where the time goes.
  got, want = [], []
  ours_s = official_s = ours_encode_s = official_encode_s = 0.0
  for record, image, g in zip(records, images, gts):
    t = time.perf_counter()
    got += single_point.evaluate_source(predictor, [record], protocol, progress=False
                                        )['variants']['center']['masks']
    ours_s += time.perf_counter() - t
    t = time.perf_counter()
    want += ref_protocol(official, image, g, NUM_POINTS)
    official_s += time.perf_counter() - t
  for image in images:
    t = time.perf_counter()
    predictor.set_image(image)
    jax.block_until_ready(predictor.features)
    ours_encode_s += time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
      official.set_image(image)
    sync()
    official_encode_s += time.perf_counter() - t

  masks = got
  assert len(masks) == len(want) == n_masks, (len(masks), len(want), n_masks)
  prompts = sum(len(w[0]) for w in want)  # clicks made (a mask predicted exactly stops early)
  same_clicks = sum(m['clicks'] == w[0] for m, w in zip(masks, want))
  miou_ours = np.array([m['iou'] for m in masks]).mean(0)
  miou_official = np.array([w[1] for w in want]).mean(0)
  n = len(records)
  result = dict(
      model=args.model, image_size=args.image_size, images=n, masks=n_masks, prompts=prompts,
      threads=args.threads, threads_note=threads_note, device=str(jax.devices()[0]),
      official_device=torch_device,
      ours_s=ours_s, official_s=official_s, ours_compile_s=compile_s,
      ours_encode_s=ours_encode_s, official_encode_s=official_encode_s,
      ours_images_per_s=n / ours_s, official_images_per_s=n / official_s,
      ours_prompts_per_s=prompts / ours_s, official_prompts_per_s=prompts / official_s,
      ratio=official_s / ours_s,
      prompt_phase_ratio=(official_s - official_encode_s) / max(ours_s - ours_encode_s, 1e-9),
      same_clicks=f'{same_clicks}/{n_masks}',
      max_abs_miou_diff=float(np.abs(miou_ours - miou_official).max()))

  print(f'\nsingle point protocol, {args.model} at {args.image_size}, {n} images, {n_masks} masks, '
        f'{prompts} prompts ({NUM_POINTS} clicks), {threads_note}; ours on {result["device"]}, '
        f'official on {torch_device}')
  print(f'{"":26}{"ours":>12}{"official":>12}{"ours/official":>15}')
  print(f'{"images/s":26}{n / ours_s:12.3f}{n / official_s:12.3f}{result["ratio"]:14.2f}x')
  print(f'{"prompts/s":26}{prompts / ours_s:12.1f}{prompts / official_s:12.1f}'
        f'{result["ratio"]:14.2f}x   goal >= {GOAL:.0f}x: '
        f'{"met" if result["ratio"] >= GOAL else "NOT met"}')
  print(f'{"of which encoding (s)":26}{ours_encode_s:12.2f}{official_encode_s:12.2f}')
  print(f'{"prompts only (s)":26}{ours_s - ours_encode_s:12.2f}'
        f'{official_s - official_encode_s:12.2f}{result["prompt_phase_ratio"]:14.2f}x')
  print(f'our warm-up pass (compiles, excluded): {compile_s:.1f} s; identical clicks '
        f'{result["same_clicks"]}, max |dmIoU| {result["max_abs_miou_diff"]:.1e}')
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
