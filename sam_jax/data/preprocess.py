"""One record -> one training example of fixed shapes, or a reason to skip it; numpy only.

  decode the image -> resize its longest side to image_size (PIL bilinear) -> pad bottom/right ->
  normalise; check every mask against the decoded image; sample up to max_masks of the usable ones;
  their ground truth at low_res_size (area average of the mask resized like the image, padded like
  it, at least half a cell covered); the first prompt of each (a point or a noisy box).

Pixels are taken as stored (EXIF orientation is not applied: SA-1B's and COCO's masks are in stored
order). Nothing a record holds stops the pipeline (``safe_preprocess``): what does not hold is
skipped and counted (``COUNTERS``).
"""
from __future__ import annotations

import io
import logging
import threading
from typing import Any

import jax
import numpy as np
from PIL import Image

from sam_jax.data import prompts, rle
from sam_jax.data.config import InputConfig
from sam_jax.utils.transforms import ResizeLongestSide, get_preprocess_shape, normalize_and_pad

# Counted per image read: ok / skipped (and why), and per mask: sampled / left out (and why).
COUNTERS = (
    'images_ok',                # became an example
    'images_corrupt',           # image bytes do not decode
    'images_no_usable_mask',    # no mask left after the checks below
    'records_unreadable',       # the record itself cannot be read (any other error)
    'masks_sampled',            # went into the example
    'masks_unsampled',          # usable, but over max_masks
    'masks_invalid_rle',        # counts string malformed or runs not covering its size
    'masks_size_mismatch',      # RLE size differs from the decoded image
    'masks_empty',              # zero area
    'masks_crowd',              # COCO iscrowd region (include_crowd=False)
    'masks_too_large',          # covers more than max_area_fraction of the image (recipe)
)

Counts = dict[str, int]


def decode_image(data: bytes, image_size: int, fast_jpeg: bool = False
                 ) -> tuple[np.ndarray, tuple[int, int]]:
  """Encoded bytes -> (resized (h, w, 3) uint8 with long side image_size, original (H, W))."""
  with Image.open(io.BytesIO(data)) as im:
    original = (im.height, im.width)
    h, w = get_preprocess_shape(*original, image_size)
    if fast_jpeg and im.format == 'JPEG':
      im.draft('RGB', (w, h))  # DCT-domain downscale by 1/2, 1/4 or 1/8, never below (w, h)
    im = im.convert('RGB')
    if im.size != (w, h):
      im = im.resize((w, h), Image.BILINEAR)
    return np.asarray(im), original


def pad_image(resized: np.ndarray, cfg: InputConfig) -> np.ndarray:
  """(h, w, 3) uint8 -> (S, S, 3): normalised float32, or uint8 when ``cfg.normalize`` is off."""
  if cfg.normalize:
    return normalize_and_pad(resized, cfg.image_size)
  out = np.zeros((cfg.image_size, cfg.image_size, 3), np.uint8)
  out[:resized.shape[0], :resized.shape[1]] = resized
  return out


def batch_spec(cfg: InputConfig, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a batch (``batch_size`` images, default ``cfg.batch_size``)."""
  b = cfg.batch_size if batch_size is None else batch_size
  return {k: jax.ShapeDtypeStruct((b,) + v.shape, v.dtype)
          for k, v in empty_example(cfg).items()}


def empty_example(cfg: InputConfig) -> dict[str, np.ndarray]:
  """An example with no valid mask (pads the last batch of a finite stream)."""
  s, m, low = cfg.image_size, cfg.max_masks, cfg.low_res_size
  return {
      'image': np.zeros((s, s, 3), np.float32 if cfg.normalize else np.uint8),
      'input_size': np.zeros(2, np.int32),
      'original_size': np.zeros(2, np.int32),
      'image_id': np.array(-1, np.int32),
      'masks': np.zeros((m, low, low), bool),
      'mask_valid': np.zeros(m, bool),
      'prompt_coords': np.zeros((m, 2, 2), np.float32),
      'prompt_labels': np.full((m, 2), prompts.NO_PROMPT_LABELS, np.int32),
      'gt_boxes': np.zeros((m, 4), np.float32),
  }


def usable_masks(masks: dict[str, Any], image_hw: tuple[int, int], cfg: InputConfig, counts: Counts
                 ) -> tuple[rle.Runs, np.ndarray]:
  """Parses every mask; counts each one left out by the first check it fails; indices of the rest."""
  n = len(masks['counts'])
  sizes = np.asarray(masks['size'], np.int64).reshape(n, 2)
  runs = rle.parse(masks['counts'], sizes)
  crowd = np.asarray(masks['is_crowd'], bool).reshape(n) if 'is_crowd' in masks else np.zeros(n, bool)
  image_area = image_hw[0] * image_hw[1]
  checks = (  # (counter, fails), in order: a mask is counted once, for its first failure
      ('masks_invalid_rle', ~runs.valid),
      ('masks_size_mismatch', (sizes != image_hw).any(axis=1)),
      ('masks_empty', runs.areas == 0),
      ('masks_crowd', crowd & (not cfg.include_crowd)),
      ('masks_too_large', runs.areas > cfg.max_area_fraction * image_area),
  )
  left = np.ones(n, bool)
  for name, fails in checks:
    counts[name] += int((left & fails).sum())
    left &= ~fails
  return runs, np.flatnonzero(left)


def preprocess(record: dict[str, Any], rng: np.random.Generator, cfg: InputConfig
               ) -> tuple[dict[str, np.ndarray] | None, Counts]:
  """A record (TFDS numpy form) -> (example, counts); example None when the image is skipped."""
  counts = dict.fromkeys(COUNTERS, 0)
  try:
    resized, original = decode_image(record['image'], cfg.image_size, cfg.fast_jpeg)
  except Exception:  # pylint: disable=broad-except  # PIL raises many kinds on bad bytes
    counts['images_corrupt'] = 1
    return None, counts
  runs, usable = usable_masks(record['masks'], original, cfg, counts)
  if not len(usable):
    counts['images_no_usable_mask'] = 1
    return None, counts
  chosen = rng.permutation(usable)[:cfg.max_masks]  # (k,) uniformly, in random order
  counts['masks_sampled'] = k = len(chosen)
  counts['masks_unsampled'] = len(usable) - k
  counts['images_ok'] = 1

  fg = rle.ForegroundRuns.select(runs, chosen)
  input_hw = resized.shape[:2]
  to_input = ResizeLongestSide(cfg.image_size)
  boxes = to_input.apply_boxes(fg.boxes(), original).astype(np.float32)  # (k, 4) xyxy
  if cfg.point_mode == 'center':
    points = prompts.center_points([record['masks']['counts'][i] for i in chosen], original)
  else:
    points = fg.sample_pixels(rng)  # (k, 2) xy in the original frame
  points = to_input.apply_coords(points, original).astype(np.float32)
  coords, labels = prompts.first_prompts(
      points, boxes, rng, input_hw, cfg.point_probability, cfg.box_noise_fraction, cfg.noise_cap)
  low = cfg.low_res_size
  scale = np.array([input_hw[0] / original[0], input_hw[1] / original[1]]) * low / cfg.image_size
  example = empty_example(cfg)
  example['image'] = pad_image(resized, cfg)
  example['input_size'] = np.array(input_hw, np.int32)
  example['original_size'] = np.array(original, np.int32)
  example['image_id'] = np.array(record.get('image_id', -1), np.int64).astype(np.int32)
  example['masks'][:k] = fg.low_res_masks(np.tile(scale, (k, 1)), low)
  example['mask_valid'][:k] = True
  example['prompt_coords'][:k] = coords
  example['prompt_labels'][:k] = labels
  example['gt_boxes'][:k] = boxes
  return example, counts


_LOGGED = [0]
_LOG_LOCK = threading.Lock()
MAX_LOGGED = 10  # tracebacks logged per process; the counter keeps counting


def safe_preprocess(record_fn, rng: np.random.Generator, cfg: InputConfig
                    ) -> tuple[dict[str, np.ndarray] | None, Counts]:
  """``preprocess(record_fn(), ...)`` where any failure (reading included) skips the record."""
  try:
    return preprocess(record_fn(), rng, cfg)
  except Exception:  # pylint: disable=broad-except  # a bad record must never stop training
    with _LOG_LOCK:
      _LOGGED[0] += 1
      if _LOGGED[0] <= MAX_LOGGED:
        logging.warning('Skipping an unreadable record (%d so far)', _LOGGED[0], exc_info=True)
    counts = dict.fromkeys(COUNTERS, 0)
    counts['records_unreadable'] = 1
    return None, counts
