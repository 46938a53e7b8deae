"""The single point valid mask protocol (SAM paper, Section 7.1 and Appendix D.1), batched.

Every mask of an image is clicked up to ``num_points`` times; the image is encoded once and the
clicks of all its masks go through the prompt encoder + decoder together, one batch on the device:

  click 1    at the mask's "center", the pixel farthest from its boundary (argmax of the distance
             transform of the zero-padded mask: ``sam_jax.data.prompts.center_point``), or, for the
             'random' variant, a pixel drawn uniformly from the mask by a generator seeded with
             (seed, record index, mask index). Multimask output, as the official predictor gives for
             one point: the most confident of the 3 masks (highest predicted IoU) is scored and fed
             back; the best of the 3 by true IoU is the "oracle".
  click k>1  at the pixel farthest from the boundary of the current error region: the false
             negatives (label 1) or the false positives (label 0), whichever's distance-transform
             peak is higher (a tie goes to the false positives, as in RITM's ``get_next_points``,
             which then draws inside the peak's half; the peak itself is taken here, as for the
             first click). Every click so far, plus the previous round's low-res logits of the
             scored mask as ``mask_input``; single output (so the oracle is a 1-click figure). A
             mask predicted exactly (no error pixel left) is done and keeps IoU 1.

IoU is measured at the original image resolution against the ground-truth mask (on the device).
Distance transforms are exact Euclidean (``sam_jax.data.prompts.farthest_pixel``: scipy on the
region's bounding box). An image's masks get their clicks in parallel, on a thread each (scipy
releases the GIL).

A dataset's usable masks are those of the input pipeline's checks (valid RLE of the image's size,
not empty, not a crowd region; no area limit); a dataset with more than ``max_masks`` of them is
subsampled to ``subsample_to`` by a fixed seed. Records that cannot be read, images that do not
decode and images without a usable mask are skipped, logged and counted, never fatal.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from sam_jax.data import preprocess, prompts
from sam_jax.data.config import InputConfig

log = logging.getLogger(__name__)

FIRST_POINTS = ('center', 'random')
REPORTED_POINTS = (1, 2, 3, 5, 9)  # the paper's columns
# Mask area ranges in pixels of the original image, as COCOeval's (areaRng): mIoU per range too.
AREA_RANGES = (('small', 0, 32**2), ('medium', 32**2, 96**2), ('large', 96**2, float('inf')))
COUNTERS = (
    'images_ok',               # evaluated
    'images_corrupt',          # image bytes do not decode
    'images_no_usable_mask',   # no annotation, or none left after the mask checks
    'records_unreadable',      # the record itself cannot be read
    'masks_invalid_rle',       # counts string malformed or runs not covering its size
    'masks_size_mismatch',     # RLE size differs from the image
    'masks_empty',             # zero area
    'masks_crowd',             # COCO iscrowd region: several objects, not one
)
MAX_LOGGED = 20  # skipped records logged one by one per dataset; all are counted


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Settings of the protocol (``config.protocol`` in ``configs/eval/*.py``)."""
  num_points: int = 9
  first_points: tuple[str, ...] = ('center',)  # variants, each a full run sharing the embedding
  seed: int = 0                   # random first points and the subsample
  max_masks: int = 15_000         # datasets with more usable masks are subsampled ...
  subsample_to: int = 10_000      # ... to this many (the paper: "over 15k ... to ~10k")
  batch_size: int = 64            # masks of one image per decoder call (padded to a power of 2)
  pad_to: int = 128               # predicted masks padded to multiples of this many rows and
                                  # columns (their logits 0 there), so that images of nearby sizes
                                  # share compiled programs; 1: exact sizes

  def __post_init__(self):
    bad = [v for v in self.first_points if v not in FIRST_POINTS]
    if bad or not self.first_points:
      raise ValueError(f'first_points {self.first_points!r}: choose from {FIRST_POINTS}')
    if self.num_points < 1 or self.batch_size < 1 or self.pad_to < 1:
      raise ValueError('num_points, batch_size and pad_to must be >= 1')


# ---------------------------------------------------------------------------------------------
# Clicks.

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def click_pool() -> ThreadPoolExecutor:
  """The process's one pool of click threads (a thread per core), shared by the per-device threads
  of ``parallel.run_split`` so that they do not each start one per core."""
  global _POOL
  with _POOL_LOCK:
    if _POOL is None:
      _POOL = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix='clicks')
    return _POOL


def _map(pool: ThreadPoolExecutor | None, fn, items) -> list:
  """``fn`` over ``items`` in order, on ``pool``'s threads if any (scipy's distance transform and
  numpy's mask arithmetic release the GIL, so an image's masks are worked on in parallel)."""
  return list(pool.map(fn, items)) if pool else [fn(x) for x in items]


def next_click(gt: np.ndarray, pred: np.ndarray) -> tuple[int, int, int] | None:
  """(x, y, label) of the next corrective click, or None when ``pred`` equals ``gt``."""
  fn_dist, fn_yx = prompts.farthest_pixel(gt & ~pred)
  fp_dist, fp_yx = prompts.farthest_pixel(pred & ~gt)
  if fn_yx is None and fp_yx is None:
    return None
  if fn_dist > fp_dist:
    return fn_yx[1], fn_yx[0], 1
  return fp_yx[1], fp_yx[0], 0


def random_points(gt: np.ndarray, seed: int, record_index: int, mask_indices: Sequence[int]
                  ) -> np.ndarray:
  """(k, h, w) bool -> (k, 2) [x, y]: a uniform pixel of each mask (row-major order), drawn with
  ``default_rng([seed, record_index, mask_index])``: independent of what else is evaluated."""
  out = np.zeros((len(gt), 2), np.float32)
  for i, (mask, j) in enumerate(zip(gt, mask_indices)):
    ys, xs = np.nonzero(mask)
    pick = np.random.default_rng([seed, record_index, int(j)]).integers(len(ys))
    out[i] = xs[pick], ys[pick]
  return out


@jax.jit
def _score(masks, iou_predictions, low_res, gt):
  """masks (B, C, H, W) bool, iou_predictions (B, C), low_res (B, C, L, L), gt (B, H, W) bool ->
  true IoUs (B, C), the most confident output (B,), its mask (B, H, W) and its logits (B, L, L)."""
  gt = gt[:, None]
  inter = jnp.sum(masks & gt, axis=(-2, -1), dtype=jnp.int32)
  union = jnp.sum(masks | gt, axis=(-2, -1), dtype=jnp.int32)
  ious = inter.astype(jnp.float32) / jnp.maximum(union, 1).astype(jnp.float32)
  best = jnp.argmax(iou_predictions, axis=1)  # (B,)
  mask = jnp.take_along_axis(masks, best[:, None, None, None], axis=1)[:, 0]
  logits = jnp.take_along_axis(low_res, best[:, None, None, None], axis=1)[:, 0]
  return ious, best, mask, logits


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass
class ClickResult:
  """The protocol's outcome for k masks of one image."""
  ious: np.ndarray         # (k, P) IoU of the scored mask after 1 .. P clicks
  oracle_iou: np.ndarray   # (k,) best of the 3 masks after the first click
  points: np.ndarray       # (k, P, 2) int [x, y] in original-image pixels
  labels: np.ndarray       # (k, P) int 1 positive, 0 negative, -1 no click (mask already exact)


def run_clicks(predictor, gt: np.ndarray, first_points: np.ndarray, num_points: int = 9,
               batch_size: int = 64, pad_to: int = 128, pool: ThreadPoolExecutor | None = None
               ) -> ClickResult:
  """The protocol for the masks ``gt`` (k, H, W) bool of the image set on ``predictor`` (a
  ``SamPredictor``), starting from ``first_points`` (k, 2) [x, y]; masks go through the decoder in
  batches of ``batch_size``; ``pad_to``: ``SamPredictor.predict_jax``'s ``pad_masks_to``; ``pool``:
  threads for the next clicks' distance transforms."""
  k = len(gt)
  b = 1 << max(min(k, batch_size) - 1, 0).bit_length()  # every batch of the image padded to b
  out = ClickResult(np.zeros((k, num_points)), np.zeros(k),
                    np.zeros((k, num_points, 2), np.int64), np.full((k, num_points), -1, np.int64))
  for s in range(0, k, batch_size):
    e = min(k, s + batch_size)
    _run_batch(predictor, gt[s:e], first_points[s:e], num_points, b, pad_to, pool,
               ClickResult(out.ious[s:e], out.oracle_iou[s:e], out.points[s:e], out.labels[s:e]))
  return out


def _run_batch(predictor, gt: np.ndarray, first_points: np.ndarray, num_points: int, b: int,
               pad_to: int, pool: ThreadPoolExecutor | None, out: ClickResult) -> None:
  """``run_clicks`` for one decoder batch padded to ``b`` rows, written into ``out``'s views."""
  n, h, w = gt.shape
  # The clicks + the official "not a point" padding point, exactly: one program for every round,
  # and with vit_b's 8 heads x (10 + 5 tokens) < 128 the decoder's cross-attention folds
  # (modeling.transformer.Attention), ~0.83x the time of 16 slots.
  prompt_len = num_points + 1
  gt_pad = np.zeros((b, _round_up(h, pad_to), _round_up(w, pad_to)), bool)
  gt_pad[:n, :h, :w] = gt
  gt_dev = jnp.asarray(gt_pad)
  points = np.zeros((b, num_points, 2), np.float64)
  labels = np.full((b, num_points), -1, np.int32)  # -1: the official "not a point"
  points[:n, 0] = first_points
  labels[:n, 0] = 1
  done = np.arange(b) >= n  # padding rows, and masks predicted exactly
  mask_input = None
  for r in range(num_points):
    if done.all():  # every mask exact: nothing left to decode
      out.ious[:, r:] = out.ious[:, r - 1:r]
      break
    coords = predictor.transform.apply_coords(points[:, :r + 1], predictor.original_size)
    # Padded masks and prompts: one program for every image size bucket and click count.
    masks, scores, low_res = predictor.predict_jax(
        coords.astype(np.float32), labels[:, :r + 1], None, mask_input, r == 0,
        pad_masks_to=pad_to, min_prompt_len=prompt_len)
    ious, best, pred, mask_input = _score(masks, scores, low_res, gt_dev)
    ious = np.asarray(ious)[:n]
    if r == 0:
      out.ious[:, 0] = ious[np.arange(n), np.asarray(best)[:n]]
      out.oracle_iou[:] = ious.max(axis=1)
    else:
      out.ious[:, r] = np.where(done[:n], out.ious[:, r - 1], ious[:, 0])
    if r + 1 == num_points:
      break
    pred = np.asarray(pred)[:, :h, :w]
    rows = np.flatnonzero(~done)
    for i, click in zip(rows, _map(pool, lambda i: next_click(gt[i], pred[i]), rows)):
      if click is None:
        done[i] = True
      else:
        points[i, r + 1], labels[i, r + 1] = click[:2], click[2]
  out.points[:] = points[:n].astype(np.int64)
  out.labels[:] = labels[:n]


# ---------------------------------------------------------------------------------------------
# Datasets.

def mask_table(record: dict[str, Any]) -> dict[str, list]:
  """A record's ``masks`` as field -> per-mask values, whether the record is the data source's form
  (a dict of lists) or the builders' (a list of ``record.mask_entry`` dicts)."""
  masks = record.get('masks', {})
  if isinstance(masks, dict):
    return masks
  masks = list(masks)
  return {key: [m[key] for m in masks] for key in (masks[0] if masks else {})}


def image_size(data: bytes) -> tuple[int, int]:
  """(h, w) from the image header, without decoding the pixels."""
  with Image.open(io.BytesIO(data)) as im:
    return im.height, im.width


def decode_image(data: bytes) -> np.ndarray:
  """Encoded bytes -> (h, w, 3) uint8 RGB, pixels as stored (as the input pipeline reads them)."""
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert('RGB'))


class Skips:
  """Counts what is skipped and logs the first ``MAX_LOGGED`` records one by one."""

  def __init__(self, name: str):
    self.name, self.counts, self.logged = name, dict.fromkeys(COUNTERS, 0), 0

  def skip(self, counter: str, index: int, why: str) -> None:
    self.counts[counter] += 1
    self.logged += 1
    if self.logged <= MAX_LOGGED:
      log.warning('%s: skipping record %d (%s): %s', self.name, index, counter, why)


def index_source(source: Sequence[dict[str, Any]], num_records: int, skips: Skips
                 ) -> list[tuple[int, np.ndarray]]:
  """(record index, indices of its usable masks) for every record with one; the rest counted."""
  checks = InputConfig(include_crowd=False, max_area_fraction=float('inf'))
  index = []
  for i in range(num_records):
    try:
      record = source[i]
      table = mask_table(record)
    except Exception as e:  # pylint: disable=broad-except  # a bad record must not stop a run
      skips.skip('records_unreadable', i, f'{type(e).__name__}: {e}')
      continue
    try:
      hw = image_size(record['image'])
    except Exception as e:  # pylint: disable=broad-except  # PIL raises many kinds
      skips.skip('images_corrupt', i, f'image does not decode: {type(e).__name__}: {e}')
      continue
    usable = np.zeros(0, np.int64)
    if len(table.get('counts', ())):
      counts = dict.fromkeys(preprocess.COUNTERS, 0)
      _, usable = preprocess.usable_masks(table, hw, checks, counts)
      dropped = {k: v for k, v in counts.items() if v}
      for k, v in dropped.items():
        skips.counts[k] += v
      if dropped:
        log.info('%s: record %d: masks left out: %s', skips.name, i, dropped)
    if not len(usable):
      skips.skip('images_no_usable_mask', i, f'{len(table.get("counts", ()))} annotations, none '
                 'usable (no masks, or every one invalid, empty or crowd)')
      continue
    index.append((i, usable))
  return index


def subsample(index: list[tuple[int, np.ndarray]], protocol: Protocol
              ) -> tuple[list[tuple[int, np.ndarray]], bool]:
  """The masks to evaluate: all of them, or ``subsample_to`` drawn without replacement by
  ``protocol.seed`` when there are more than ``max_masks``."""
  sizes = np.array([len(m) for _, m in index], np.int64)
  total = int(sizes.sum())
  if total <= protocol.max_masks:
    return index, False
  keep = np.random.default_rng(protocol.seed).choice(total, protocol.subsample_to, replace=False)
  keep_mask = np.zeros(total, bool)
  keep_mask[keep] = True
  out, start = [], 0
  for (i, masks), size in zip(index, sizes):
    chosen = masks[keep_mask[start:start + size]]
    start += size
    if len(chosen):
      out.append((i, chosen))
  return out, True


def miou_by_points(ious: np.ndarray) -> dict[str, float | None]:
  """(M, P) -> {"1": mIoU after 1 click, ..., "P": ...} (None when there are no masks)."""
  return {str(p + 1): (float(ious[:, p].mean()) if len(ious) else None)
          for p in range(ious.shape[1])}


def select_masks(source: Sequence[dict[str, Any]], protocol: Protocol, *, name: str = 'dataset',
                 max_images: int = 0) -> tuple[list[tuple[int, np.ndarray]], dict[str, Any]]:
  """The (record index, mask indices) to evaluate (every host computes the same), and what the
  selection found: records_read, usable_masks, subsampled, skipped (counts)."""
  num_records = len(source) if not max_images else min(len(source), max_images)
  skips = Skips(name)
  index = index_source(source, num_records, skips)
  if skips.logged > MAX_LOGGED:
    log.warning('%s: %d records skipped in all (the first %d logged)', name, skips.logged,
                MAX_LOGGED)
  selected, subsampled = subsample(index, protocol)
  return selected, {'records_read': num_records, 'usable_masks': int(sum(len(m) for _, m in index)),
                    'subsampled': subsampled, 'skipped': skips.counts}


def run_images(predictor, source: Sequence[dict[str, Any]], selected, protocol: Protocol, *,
               name: str = 'dataset', progress: bool = True) -> list[dict[str, Any]]:
  """The protocol on ``selected`` [(record index, mask indices), ...] (from ``select_masks``): per
  image a JSON-serialisable entry {record, counts (skips), masks: {variant: [per mask: record,
  image_id, mask, id, first_point, clicks, iou (after 1 .. P clicks), oracle_iou]}}."""
  from tqdm import tqdm
  skips = Skips(name)
  out = []
  num_masks, iou1_sum = 0, 0.0  # the first variant's, for the progress bar
  bar = tqdm(selected, desc=name, unit='img', disable=not progress, dynamic_ncols=True)
  pool = click_pool()
  for i, chosen in bar:
    skips.counts = dict.fromkeys(COUNTERS, 0)  # this image's
    entry = {'record': int(i), 'counts': skips.counts, 'masks': {}}
    out.append(entry)
    try:
      record = source[i]
      table = mask_table(record)
      counts = [c.encode() if isinstance(c, str) else bytes(c) for c in
                (table['counts'][j] for j in chosen)]
    except Exception as e:  # pylint: disable=broad-except  # read fine once: flaky storage
      skips.skip('records_unreadable', i, f'{type(e).__name__}: {e}')
      continue
    try:
      image = decode_image(record['image'])
    except Exception as e:  # pylint: disable=broad-except  # e.g. a truncated JPEG
      skips.skip('images_corrupt', i, f'image does not decode: {type(e).__name__}: {e}')
      continue
    hw = image.shape[:2]
    gt = mask_utils.decode([{'size': list(hw), 'counts': c} for c in counts])  # (h, w, k)
    gt = np.ascontiguousarray(gt.transpose(2, 0, 1).astype(bool))  # (k, h, w)
    predictor.set_image(image)
    for variant in protocol.first_points:
      if variant == 'center':
        first = np.array(_map(pool, prompts.center_point, gt), np.float32).reshape(-1, 2)
      else:
        first = random_points(gt, protocol.seed, i, chosen)
      res = run_clicks(predictor, gt, first, protocol.num_points, protocol.batch_size,
                       protocol.pad_to, pool)
      entry['masks'][variant] = [{
          'record': int(i), 'image_id': int(record.get('image_id', -1)), 'mask': int(j),
          'id': int(table['id'][j]) if 'id' in table else -1,
          'first_point': [int(v) for v in res.points[m, 0]],
          'clicks': [[int(x), int(y), int(lab)]
                     for (x, y), lab in zip(res.points[m], res.labels[m]) if lab >= 0],
          'area': int(gt[m].sum()), 'iou': res.ious[m].tolist(),
          'oracle_iou': float(res.oracle_iou[m])}
                                 for m, j in enumerate(chosen)]
    predictor.reset_image()
    skips.counts['images_ok'] += 1
    first = entry['masks'][protocol.first_points[0]]
    num_masks += len(first)
    iou1_sum += sum(m['iou'][0] for m in first)
    bar.set_postfix(masks=num_masks, miou1=f'{iou1_sum / num_masks:.3f}')
  bar.close()
  if skips.logged > MAX_LOGGED:
    log.warning('%s: %d skipped records in all (the first %d logged)', name, skips.logged,
                MAX_LOGGED)
  return out


def summarize(per_image: Sequence[dict[str, Any]], protocol: Protocol, selection: dict[str, Any]
              ) -> dict[str, Any]:
  """The figures of all ``per_image`` entries (from any number of ``run_images`` calls, in any
  order) and of ``select_masks``'s ``selection``; see ``sam_jax.evaluation.report``."""
  per_image = sorted(per_image, key=lambda e: e['record'])
  skipped = dict(selection['skipped'])
  for e in per_image:
    for k, v in e['counts'].items():
      skipped[k] += v
  variants = {}
  for v in protocol.first_points:
    raw = [m for e in per_image for m in e['masks'].get(v, ())]
    masks = [dict(m, iou=[round(x, 6) for x in m['iou']], oracle_iou=round(m['oracle_iou'], 6))
             for m in raw]
    ious = np.array([m['iou'] for m in raw]).reshape(-1, protocol.num_points)  # (M, P)
    oracle = np.array([m['oracle_iou'] for m in raw])
    area = np.array([m['area'] for m in raw])
    by_area = {}
    for name, lo, hi in AREA_RANGES:
      sel = (area >= lo) & (area < hi)
      by_area[name] = {'masks': int(sel.sum()), 'miou': miou_by_points(ious[sel]),
                       'oracle_miou_1': float(oracle[sel].mean()) if sel.any() else None}
    variants[v] = {'miou': miou_by_points(ious),
                   'oracle_miou_1': float(oracle.mean()) if len(oracle) else None,
                   'by_area': by_area, 'masks': masks}
  return {'records_read': selection['records_read'], 'images': skipped['images_ok'],
          'masks': len(variants[protocol.first_points[0]]['masks']),
          'usable_masks': selection['usable_masks'], 'subsampled': selection['subsampled'],
          'skipped': skipped, 'variants': variants}


def evaluate_source(predictor, source: Sequence[dict[str, Any]], protocol: Protocol = Protocol(),
                    *, name: str = 'dataset', max_images: int = 0, progress: bool = True
                    ) -> dict[str, Any]:
  """The protocol over a random-access source of records (``sam_jax.data.sources.open_source``),
  the first ``max_images`` records only when that is > 0, on one device. Returns every figure and
  every mask's clicks (see ``sam_jax.evaluation.report``)."""
  start = time.time()
  selected, selection = select_masks(source, protocol, name=name, max_images=max_images)
  per_image = run_images(predictor, source, selected, protocol, name=name, progress=progress)
  return {**summarize(per_image, protocol, selection), 'seconds': round(time.time() - start, 2)}
