"""Small source datasets written on the spot, for tests and benchmarks (SA-1B and COCO formats).

Images and masks come from ``synthetic_shapes`` (small) or from ``sa1b_like`` (SA-1B's size: a
1500 x 2250 photo-like JPEG and ~100 masks of SA-1B's spread of sizes). Masks are encoded with
``pycocotools.mask.encode``; every annotation carries SA-1B's fields.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_utils

from sam_jax.data import synthetic_shapes


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='JPEG', quality=quality)
  return buf.getvalue()


def encode(mask: np.ndarray) -> dict[str, Any]:
  """(h, w) bool -> COCO RLE with str counts (as in SA-1B's JSON)."""
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {'size': [int(v) for v in rle['size']], 'counts': rle['counts'].decode()}


def sa1b_annotation(image_id: int, file_name: str, height: int, width: int,
                    rles: list[dict[str, Any]], rng: np.random.Generator) -> dict[str, Any]:
  """An SA-1B JSON document for already encoded masks."""
  anns = []
  for i, rle in enumerate(rles):
    enc = {'size': rle['size'], 'counts': rle['counts'].encode() if isinstance(rle['counts'], str)
           else rle['counts']}
    try:
      bbox = [float(v) for v in mask_utils.toBbox(enc)]
      area = int(mask_utils.area(enc))
    except Exception:  # pylint: disable=broad-except  # deliberately broken fixtures
      bbox, area = [0.0] * 4, 0
    anns.append({
        'id': image_id * 1000 + i, 'segmentation': rle, 'bbox': bbox, 'area': area,
        'predicted_iou': float(rng.uniform(0.88, 1.0)),
        'stability_score': float(rng.uniform(0.95, 1.0)),
        'crop_box': [0.0, 0.0, float(width), float(height)],
        'point_coords': [[float(rng.uniform(0, width)), float(rng.uniform(0, height))]],
    })
  return {'image': {'image_id': image_id, 'width': width, 'height': height,
                    'file_name': file_name}, 'annotations': anns}


def small_sa1b_sample(seed: int, index: int, image_size: int = 64
                      ) -> tuple[bytes, list[dict[str, Any]], np.ndarray]:
  """(JPEG bytes, RLEs, (n, h, w) bool masks) from a synthetic-shapes image."""
  sample = synthetic_shapes.render(seed, index, synthetic_shapes.ShapesSpec(image_size=image_size))
  return jpeg_bytes(sample.image), [encode(m) for m in sample.masks], sample.masks


def write_sa1b_folder(folder: str, items: list[tuple[str, bytes, dict[str, Any]]]) -> None:
  """Writes <stem>.jpg + <stem>.json for every (stem, jpeg, annotation)."""
  os.makedirs(folder, exist_ok=True)
  for stem, jpg, ann in items:
    with open(os.path.join(folder, stem + '.jpg'), 'wb') as f:
      f.write(jpg)
    with open(os.path.join(folder, stem + '.json'), 'w') as f:
      json.dump(ann, f)


def write_sa1b_tar(path: str, items: list[tuple[str, bytes, dict[str, Any]]]) -> None:
  """An SA-1B-like shard: <stem>.jpg, <stem>.json, ... in one uncompressed tar."""
  with tarfile.open(path, 'w') as tar:
    for stem, jpg, ann in items:
      for name, data in ((stem + '.jpg', jpg), (stem + '.json', json.dumps(ann).encode())):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """(h, w, 3) uint8 with smooth regions, edges and sensor-like noise (JPEG sizes like photos')."""
  img = Image.new('RGB', (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
  draw = ImageDraw.Draw(img)
  for _ in range(200):
    x, y = rng.uniform(0, width), rng.uniform(0, height)
    r = float(np.exp(rng.uniform(np.log(8), np.log(width / 3))))
    draw.ellipse([x - r, y - r * rng.uniform(0.3, 1), x + r, y + r],
                 fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
  img = img.filter(ImageFilter.GaussianBlur(1.5))
  noise = rng.normal(0, 6, (height, width, 1)).astype(np.float32)
  return np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8)


def blob_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """An irregular object mask; sqrt(area / image area) log-uniform in [0.01, 0.7] as in SA-1B's
  spread of mask sizes."""
  r = float(np.exp(rng.uniform(np.log(0.01), np.log(0.7)))) * np.sqrt(height * width)
  cx, cy = rng.uniform(0, width), rng.uniform(0, height)
  n = int(rng.integers(8, 40))
  angles = np.sort(rng.uniform(0, 2 * np.pi, n))
  radii = 0.6 * r * rng.uniform(0.5, 1.3, n)
  aspect = float(np.exp(rng.normal(0, 0.4)))
  points = np.stack([cx + radii * np.cos(angles) * aspect, cy + radii * np.sin(angles) / aspect], 1)
  canvas = Image.new('L', (width, height))
  ImageDraw.Draw(canvas).polygon([tuple(p) for p in points.tolist()], fill=1)
  return np.asarray(canvas, bool)


def sa1b_like(rng: np.random.Generator, height: int = 1500, width: int = 2250,
              num_masks: int = 100) -> tuple[bytes, list[dict[str, Any]]]:
  """An SA-1B-sized image: (JPEG bytes, RLEs of ``num_masks`` non-empty masks)."""
  rles = []
  while len(rles) < num_masks:
    mask = blob_mask(rng, height, width)
    if mask.any():
      rles.append(encode(mask))
  return jpeg_bytes(photo_like(rng, height, width)), rles
