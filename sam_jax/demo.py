"""Segments scikit-image's sample photographs and writes overlay PNGs: the CPU demo.

  python -m sam_jax.demo --out out/demo                      # random-weight vit_tiny, no downloads
  python -m sam_jax.demo --model-type vit_b --checkpoint sam_vit_b_01ec64.pth --out out/demo

For each photo: one foreground point at the centre, and a box around the middle, each giving the
best of the three multimask outputs. With random weights the masks are meaningless shapes; the demo
shows the whole path (load, encode, prompt, decode, postprocess) running.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sam_jax import SamPredictor, sam_model_registry
from sam_jax.visualize import save_overlay

PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket')


def sample_photos() -> dict[str, np.ndarray]:
  import skimage.data
  return {name: getattr(skimage.data, name)() for name in PHOTOS}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m sam_jax.demo', description=__doc__.split('\n')[0])
  parser.add_argument('--model-type', default='vit_tiny', choices=sorted(sam_model_registry))
  parser.add_argument('--checkpoint', default=None, help='weights; random (seeded) when omitted')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='out/demo')
  args = parser.parse_args(argv)

  sam = sam_model_registry[args.model_type](checkpoint=args.checkpoint, seed=args.seed)
  predictor = SamPredictor(sam)
  out = Path(args.out)
  summary = {}
  for name, image in tqdm(sample_photos().items(), desc='photos'):
    h, w = image.shape[:2]
    t0 = time.perf_counter()
    predictor.set_image(image)
    point, label = np.array([[w / 2, h / 2]]), np.array([1])
    box = np.array([w * 0.25, h * 0.25, w * 0.75, h * 0.75])
    results = {}
    for kind, kw in (('point', dict(point_coords=point, point_labels=label)), ('box', dict(box=box))):
      masks, scores, _ = predictor.predict(**kw)
      best = int(np.argmax(scores))
      path = save_overlay(out / f'{name}_{kind}.png', image, masks[best],
                          points=kw.get('point_coords'), labels=kw.get('point_labels'),
                          box=kw.get('box'))
      results[kind] = dict(png=str(path), score=float(scores[best]),
                           area=int(masks[best].sum()))
    results['seconds'] = round(time.perf_counter() - t0, 3)
    summary[name] = results
  (out / 'summary.json').write_text(json.dumps(summary, indent=1))
  print(f'wrote {2 * len(summary)} overlays and summary.json to {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
