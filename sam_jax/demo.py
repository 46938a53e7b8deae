"""Pictures of a model's masks: held-out synthetic shapes (ground truth | one click per object) and
scikit-image's sample photographs (a point and a box each), as overlay PNGs + summary.json.

  python -m sam_jax.demo --checkpoint out/tiny --out out/demo            # a training workdir
  python -m sam_jax.demo --model-type vit_b --checkpoint sam_vit_b_01ec64.pth --out out/demo
  python -m sam_jax.demo --out out/demo                                   # random weights

The click on each held-out object is its centre (the point farthest from the boundary, as in the
paper's single-point protocol); the mask shown is the most confident of the three outputs. The
mIoU over the shown objects is printed; ``make demo`` trains ``configs/tiny.py`` first (its
held-out evaluation is in the workdir's summary.json).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sam_jax import SamPredictor, sam_model_registry
from sam_jax.data import prompts
from sam_jax.visualize import overlay, save_overlay

PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket')


def sample_photos() -> dict[str, np.ndarray]:
  import skimage.data
  return {name: getattr(skimage.data, name)() for name in PHOTOS}


def held_out_shapes(count: int, data_dir: str | None, max_objects: int = 4
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
  """``count`` images of synthetic_shapes' validation split (built on first use) and up to
  ``max_objects`` of their masks each, largest first: [(HxWx3 uint8, (k, H, W) bool)]."""
  from PIL import Image
  from pycocotools import mask as mask_utils
  from sam_jax.data import sources
  from sam_jax.data.config import InputConfig
  from sam_jax.training.loop import ensure_dataset
  ensure_dataset(InputConfig(dataset='synthetic_shapes', data_dir=data_dir))
  source = sources.open_source('synthetic_shapes', data_dir, 'validation')
  out = []
  for i in range(min(count, len(source))):
    record = source[i]
    image = np.asarray(Image.open(io.BytesIO(record['image'])).convert('RGB'))
    m = record['masks']
    rles = [{'counts': c, 'size': [int(v) for v in s]} for c, s in zip(m['counts'], m['size'])]
    masks = mask_utils.decode(rles).transpose(2, 0, 1).astype(bool)  # (n, H, W)
    order = np.argsort(-masks.sum((1, 2)))[:max_objects]
    out.append((image, masks[order]))
  return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
  union = np.logical_or(a, b).sum()
  return float(np.logical_and(a, b).sum() / union) if union else 1.0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m sam_jax.demo', description=__doc__.split('\n')[0])
  parser.add_argument('--model-type', default='vit_tiny', choices=sorted(sam_model_registry))
  parser.add_argument('--checkpoint', default=None,
                      help='training workdir, official .pth, HF safetensors or orbax dir; '
                      'random (seeded) weights when omitted')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--num-shapes', type=int, default=6, help='held-out synthetic images')
  parser.add_argument('--data-dir', default=None, help='TFDS data dir (default: TFDS default)')
  parser.add_argument('--out', default='out/demo')
  args = parser.parse_args(argv)

  sam = sam_model_registry[args.model_type](checkpoint=args.checkpoint, seed=args.seed)
  predictor = SamPredictor(sam)
  out = Path(args.out)
  summary = {'checkpoint': args.checkpoint, 'model_type': args.model_type, 'shapes': {},
             'photos': {}}

  ious = []
  for i, (image, masks) in enumerate(tqdm(held_out_shapes(args.num_shapes, args.data_dir),
                                          desc='held-out shapes')):
    predictor.set_image(image)
    points = np.array([prompts.center_point(m) for m in masks], np.float32)
    predicted = []
    for point, gt in zip(points, masks):
      pred, scores, _ = predictor.predict(point_coords=point[None], point_labels=np.array([1]))
      predicted.append(pred[int(np.argmax(scores))])
      ious.append(iou(predicted[-1], gt))
    picture = np.concatenate([overlay(image, masks), overlay(image, np.stack(predicted),
                                                             points=points)], axis=1)
    path = save_overlay(out / f'shapes_{i}.png', picture, np.zeros((0,) + picture.shape[:2]))
    summary['shapes'][path.name] = [round(v, 4) for v in ious[-len(masks):]]
  summary['shapes_miou_centre_click'] = round(float(np.mean(ious)), 4)

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
      results[kind] = dict(png=str(path), score=float(scores[best]), area=int(masks[best].sum()))
    results['seconds'] = round(time.perf_counter() - t0, 3)
    summary['photos'][name] = results
  (out / 'summary.json').write_text(json.dumps(summary, indent=1))
  print(f'held-out synthetic shapes, one centre click per object: mIoU '
        f'{summary["shapes_miou_centre_click"]:.3f} over {len(ious)} objects')
  print(f'wrote {len(summary["shapes"])} shape pictures (ground truth | prediction) and '
        f'{2 * len(summary["photos"])} photo overlays to {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
