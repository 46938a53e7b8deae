"""Synthetic shapes: images of overlapping textured shapes with their visible instance masks.

Generated on the spot and deterministic from a seed, so the tiny config, the demo and the tests need
no download. Every image has 3-8 shapes of five kinds (ellipse, rotated rectangle, triangle, irregular
polygon, ring) painted in order over a textured background, each with its own colour and texture
(solid, stripes, checker, noise, gradient). A shape's mask is what stays visible after the shapes
painted over it; shapes left with fewer than ``min_visible_px`` pixels are dropped. The long side is
``image_size``, the short side 60-100% of it, landscape or portrait.

  python -m sam_jax.data.build synthetic_shapes --data_dir ~/tensorflow_datasets \
      [--config default] [--image_size 256 --num_train 2000 --num_validation 200 --seed 0]
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from sam_jax.data import record

KINDS = ('ellipse', 'rectangle', 'triangle', 'polygon', 'ring')
TEXTURES = ('solid', 'stripes', 'checker', 'noise', 'gradient')
SPLIT_KEYS = {'train': 0, 'validation': 1}


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
  """How the images are drawn."""
  image_size: int = 256
  min_shapes: int = 3
  max_shapes: int = 8
  min_visible_px: int = 24
  min_aspect: float = 0.6  # short side / long side


@dataclasses.dataclass(frozen=True)
class SyntheticImage:
  image: np.ndarray  # (h, w, 3) uint8
  masks: np.ndarray  # (n, h, w) bool, visible part of each shape, paint order
  kinds: tuple[str, ...]


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """(h, w, 3) uint8 texture of one of ``TEXTURES`` in random colours."""
  c0, c1 = rng.integers(0, 256, (2, 3)).astype(np.float32)
  yy, xx = np.mgrid[:h, :w].astype(np.float32)
  kind = TEXTURES[rng.integers(len(TEXTURES))]
  if kind == 'solid':
    t = np.zeros((h, w), np.float32)
  elif kind == 'stripes':
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 16)
    t = ((xx * np.cos(angle) + yy * np.sin(angle)) // (period / 2) % 2).astype(np.float32)
  elif kind == 'checker':
    cell = rng.uniform(3, 12)
    t = ((xx // cell + yy // cell) % 2).astype(np.float32)
  elif kind == 'noise':
    t = rng.random((h, w), np.float32)
  else:  # gradient
    angle = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(angle) + yy * np.sin(angle)
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
  return (c0 + t[..., None] * (c1 - c0)).clip(0, 255).astype(np.uint8)


def _shape_mask(rng: np.random.Generator, h: int, w: int) -> tuple[str, np.ndarray]:
  """One random shape: its kind and (h, w) bool mask."""
  kind = KINDS[rng.integers(len(KINDS))]
  size = min(h, w)
  cx, cy = rng.uniform(0, w), rng.uniform(0, h)
  rx, ry = rng.uniform(0.08, 0.35, 2) * size
  angle = rng.uniform(0, 2 * np.pi)
  canvas = Image.new('L', (w, h))
  draw = ImageDraw.Draw(canvas)

  def polygon(radii: np.ndarray, angles: np.ndarray) -> list[tuple[float, float]]:
    x, y = radii * np.cos(angles), radii * np.sin(angles) * ry / rx
    xr = cx + x * np.cos(angle) - y * np.sin(angle)
    yr = cy + x * np.sin(angle) + y * np.cos(angle)
    return list(zip(xr.tolist(), yr.tolist()))

  if kind in ('ellipse', 'ring'):
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
    if kind == 'ring':
      f = rng.uniform(0.35, 0.7)
      draw.ellipse([cx - f * rx, cy - f * ry, cx + f * rx, cy + f * ry], fill=0)
  elif kind == 'rectangle':
    corners = np.array([1, 3, 5, 7]) * np.pi / 4
    draw.polygon(polygon(np.full(4, rx * np.sqrt(2)), corners), fill=1)
  elif kind == 'triangle':
    draw.polygon(polygon(np.full(3, rx), np.sort(rng.uniform(0, 2 * np.pi, 3))), fill=1)
  else:  # irregular polygon, star-shaped around its centre
    n = int(rng.integers(5, 12))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    draw.polygon(polygon(rx * rng.uniform(0.4, 1.0, n), angles), fill=1)
  return kind, np.asarray(canvas, bool)


def render(seed: int, index: int, spec: ShapesSpec = ShapesSpec(), split_key: int = 0
           ) -> SyntheticImage:
  """Image ``index`` of the set drawn from ``seed``: the same arguments give the same pixels."""
  rng = np.random.default_rng([seed, split_key, index])
  long_side = spec.image_size
  short_side = max(1, int(round(long_side * rng.uniform(spec.min_aspect, 1.0))))
  h, w = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
  image = _texture(rng, h, w)
  kinds, masks = [], []
  for _ in range(int(rng.integers(spec.min_shapes, spec.max_shapes + 1))):
    kind, shape = _shape_mask(rng, h, w)
    if not shape.any():
      continue
    image = np.where(shape[..., None], _texture(rng, h, w), image)
    masks = [m & ~shape for m in masks]
    masks.append(shape)
    kinds.append(kind)
  keep = [i for i, m in enumerate(masks) if m.sum() >= spec.min_visible_px]
  stacked = np.stack([masks[i] for i in keep]) if keep else np.zeros((0, h, w), bool)
  return SyntheticImage(image=image, masks=stacked, kinds=tuple(kinds[i] for i in keep))


def to_record(sample: SyntheticImage, image_id: int) -> dict:
  """The stored record: PNG bytes (lossless, so masks match pixels exactly) and RLE masks."""
  h, w = sample.image.shape[:2]
  buf = io.BytesIO()
  Image.fromarray(sample.image).save(buf, format='PNG')
  masks = []
  for i, (mask, kind) in enumerate(zip(sample.masks, sample.kinds)):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    masks.append(record.mask_entry(
        rle['counts'], rle['size'], bbox=mask_utils.toBbox(rle), area=int(mask_utils.area(rle)),
        category_id=KINDS.index(kind) + 1, id=image_id * 100 + i))
  return record.make_record(buf.getvalue(), masks, image_id=image_id,
                            file_name=f'{image_id:08d}.png', height=h, width=w)


@dataclasses.dataclass(eq=False)
class SyntheticShapesConfig(tfds.core.BuilderConfig):
  image_size: int = 256
  num_train: int = 2000
  num_validation: int = 200
  seed: int = 0

  def __post_init__(self):
    self.description = self.description or (
        f'{self.image_size} px long side, {self.num_train} train + {self.num_validation} '
        f'validation images, seed {self.seed}')


class SyntheticShapes(record.RecordBuilder):
  """Synthetic shapes with visible instance masks (see module docstring)."""

  BUILDER_CONFIGS = [
      SyntheticShapesConfig(name='default', description='256 px for vit_tiny: 2000 + 200 images'),
      SyntheticShapesConfig(name='s1024', image_size=1024, num_train=2000, num_validation=200,
                            description='1024 px for the official variants: 2000 + 200 images'),
  ]

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    return {'train': self._generate_examples('train', cfg.num_train),
            'validation': self._generate_examples('validation', cfg.num_validation)}

  def _generate_examples(self, split: str, count: int):
    cfg = self.builder_config
    spec = ShapesSpec(image_size=cfg.image_size)
    for index in range(count):
      yield index, to_record(render(cfg.seed, index, spec, SPLIT_KEYS[split]), image_id=index)
