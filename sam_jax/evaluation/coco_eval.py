"""COCO mask metrics through pycocotools' ``COCOeval``, on ground truth built from our records.

``ground_truth`` turns dataset records (``sam_jax.data.record``) into a pycocotools ``COCO``: every
mask whose RLE is valid, of the decoded image's size and not empty becomes an annotation (ids 1..N,
since COCOeval reads an id of 0 as "unmatched"); COCO crowd regions go in with ``iscrowd=1``, so
that detections on them are ignored, neither true nor false positives; a mask's area is the
record's (COCO's polygon area, which decides the S / M / L bucket) or, where the record has none,
the RLE's pixel count. What is left out is counted, never fatal.

``mask_ap``: category-aware mask AP, AP50, AP75, AP_S, AP_M, AP_L (100 detections per image), for
instance segmentation. ``mask_ar``: class-agnostic (``useCats=0``) mask AR@10, @100, @1000 and
AR_S / AR_M / AR_L @1000, for object proposals. Figures are fractions in [0, 1]; None where
COCOeval has nothing to average (no ground truth, or none of a size); an empty result list gives
0 (None where there is no ground truth of that size). pycocotools' prints go to this module's
logger (DEBUG).

``read_image`` is the record reader the COCO-style protocols (``instances``, ``proposals``) share:
a record, its decoded image and its mask checks, every skip counted per image.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from typing import Any, Iterable, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sam_jax.data import preprocess
from sam_jax.data.config import InputConfig
from sam_jax.evaluation.single_point import Skips, decode_image, image_size, mask_table

log = logging.getLogger(__name__)

# Per dataset: images evaluated / skipped (and why), and ground-truth masks left out (and why).
COUNTERS = (
    'images_ok',               # evaluated
    'images_corrupt',          # image bytes do not decode
    'images_no_usable_mask',   # no annotation, or none valid (crowd regions count as valid)
    'images_duplicate_id',     # image_id of an earlier record: COCO matches results by image_id
    'records_unreadable',      # the record itself cannot be read
    'masks_invalid_rle',       # counts string malformed or runs not covering its size
    'masks_size_mismatch',     # RLE size differs from the decoded image
    'masks_empty',             # zero area: nothing can match it
)
MASK_COUNTERS = COUNTERS[-3:]
AP_KEYS = ('AP', 'AP50', 'AP75', 'AP_S', 'AP_M', 'AP_L')
AR_MAX_DETS = (10, 100, 1000)
AR_KEYS = ('AR@10', 'AR@100', 'AR@1000', 'AR_S@1000', 'AR_M@1000', 'AR_L@1000')
# The mask checks of the input pipeline, crowd regions kept (COCO's ignore regions), no area limit.
_GT_CHECKS = InputConfig(include_crowd=True, max_area_fraction=float('inf'))


@contextlib.contextmanager
def _quiet():
  """pycocotools prints progress on stdout: to the log instead."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    yield
  if out.getvalue().strip():
    log.debug('pycocotools: %s', out.getvalue().strip())


def usable_masks(record: dict[str, Any], hw: tuple[int, int], counts: dict[str, int]
                 ) -> tuple[dict[str, list], np.ndarray, np.ndarray]:
  """(mask table, indices of the masks that can be ground truth, their pixel areas); the others
  are added to ``counts`` under ``MASK_COUNTERS``."""
  table = mask_table(record)
  if not len(table.get('counts', ())):
    return table, np.zeros(0, np.int64), np.zeros(0, np.int64)
  checks = dict.fromkeys(preprocess.COUNTERS, 0)
  runs, usable = preprocess.usable_masks(table, hw, _GT_CHECKS, checks)
  for k in MASK_COUNTERS:
    counts[k] += checks[k]
  return table, usable, runs.areas[usable]


@dataclasses.dataclass
class GroundTruth:
  """A pycocotools ground truth and what was left out of it."""
  coco: COCO
  counts: dict[str, int]  # COUNTERS: images_ok = images in ``coco``

  @property
  def image_ids(self) -> set[int]:
    return set(self.coco.getImgIds())

  @property
  def num_masks(self) -> int:
    return len(self.coco.dataset['annotations'])

  @property
  def num_crowd(self) -> int:
    return sum(a['iscrowd'] for a in self.coco.dataset['annotations'])


def ground_truth(pairs: Iterable[tuple[dict[str, Any], tuple[int, int] | None]]) -> GroundTruth:
  """A ``COCO`` of (record, (h, w) of its decoded image or None to read the image header) pairs,
  each record an image even when none of its masks is left. Records whose image does not read, or
  whose image_id repeats an earlier one, are left out and counted."""
  counts = dict.fromkeys(COUNTERS, 0)
  images, annotations, categories = [], [], set()
  seen: set[int] = set()
  for n, (record, hw) in enumerate(pairs):
    image_id = int(record['image_id'])
    if image_id in seen:
      counts['images_duplicate_id'] += 1
      log.warning('ground truth: record %d repeats image_id %d: left out', n, image_id)
      continue
    if hw is None:
      try:
        hw = image_size(record['image'])
      except Exception as e:  # pylint: disable=broad-except  # PIL raises many kinds
        counts['images_corrupt'] += 1
        log.warning('ground truth: image %d does not read (%s): left out', image_id, e)
        continue
    seen.add(image_id)
    counts['images_ok'] += 1
    h, w = int(hw[0]), int(hw[1])
    images.append({'id': image_id, 'height': h, 'width': w})
    table, usable, areas = usable_masks(record, (h, w), counts)
    for j, pixels in zip(usable, areas):
      counts_j = table['counts'][j]
      category = int(table['category_id'][j]) if 'category_id' in table else 0
      area = float(table['area'][j]) if 'area' in table else 0.0
      categories.add(category)
      annotations.append({
          'id': len(annotations) + 1, 'image_id': image_id, 'category_id': category,
          'segmentation': {'size': [h, w], 'counts': counts_j.decode()
                           if isinstance(counts_j, bytes) else str(counts_j)},
          'area': area if area > 0 else float(pixels),
          'iscrowd': int(bool(table['is_crowd'][j])) if 'is_crowd' in table else 0,
          'bbox': [float(v) for v in table['bbox'][j]] if 'bbox' in table else [0.0] * 4})
  coco = COCO()
  coco.dataset = {'images': images, 'annotations': annotations,
                  'categories': [{'id': c, 'name': str(c)} for c in sorted(categories)]}
  with _quiet():
    coco.createIndex()
  return GroundTruth(coco, counts)


def _check_results(gt: COCO, results: Sequence[dict[str, Any]]) -> None:
  """A clear error for results COCOeval would reject with a bare assertion."""
  unknown = {r['image_id'] for r in results} - set(gt.getImgIds())
  if unknown:
    raise ValueError(f'{len(unknown)} result image ids are not in the ground truth, e.g. '
                     f'{sorted(unknown)[:5]}; drop them (or evaluate those images) first')
  bad = next((r for r in results if 'segmentation' not in r or 'score' not in r), None)
  if bad is not None:
    raise ValueError('a result needs "segmentation" (COCO RLE) and "score": got keys '
                     f'{sorted(bad)}')


def _coco_eval(gt: COCO, results: Sequence[dict[str, Any]], use_cats: bool,
               max_dets: Sequence[int], keys: Sequence[str], stats_at: Sequence[int]
               ) -> dict[str, float | None]:
  """COCOeval 'segm' stats ``stats_at`` as ``keys``: None where there is nothing to average."""
  _check_results(gt, results)
  if all(a['iscrowd'] for a in gt.dataset['annotations']):
    return dict.fromkeys(keys)  # nothing to find: undefined, not 0
  if not results:
    # loadRes fails on an empty list. One empty mask scored 0 matches nothing, so every figure
    # stays 0, and sizes without ground truth come out undefined as they do with results.
    image = gt.dataset['images'][0]
    empty = mask_utils.encode(np.zeros((image['height'], image['width'], 1), np.uint8, order='F'))
    results = [{'image_id': image['id'], 'category_id': gt.getCatIds()[0], 'score': 0.0,
                'segmentation': {'size': [image['height'], image['width']],
                                 'counts': empty[0]['counts'].decode()}}]
  with _quiet():
    dt = gt.loadRes([dict(r) for r in results])  # loadRes writes area / bbox / id into them
    e = COCOeval(gt, dt, iouType='segm')
    e.params.useCats = int(use_cats)
    e.params.maxDets = list(max_dets)
    e.evaluate()
    e.accumulate()
    e.summarize()
  return {k: (None if e.stats[i] < 0 else float(e.stats[i])) for k, i in zip(keys, stats_at)}


def mask_ap(gt: COCO, results: Sequence[dict[str, Any]]) -> dict[str, float | None]:
  """Category-aware mask AP (IoU .50:.95), AP50, AP75, AP_S, AP_M, AP_L, 100 detections per image.

  results: [{"image_id", "category_id", "segmentation": COCO RLE, "score"}, ...] of images in
  ``gt``."""
  return _coco_eval(gt, results, True, (1, 10, 100), AP_KEYS, range(6))


def mask_ar(gt: COCO, results: Sequence[dict[str, Any]]) -> dict[str, float | None]:
  """Class-agnostic mask AR@10, @100, @1000 and AR_S / AR_M / AR_L @1000 (IoU .50:.95): the
  best-scored 10 / 100 / 1000 results of each image (``category_id`` ignored)."""
  return _coco_eval(gt, results, False, AR_MAX_DETS, AR_KEYS, range(6, 12))


# ---------------------------------------------------------------------------------------------
# Records of the COCO-style protocols.

@dataclasses.dataclass
class LoadedImage:
  """A record that a protocol can evaluate, and its decoded pixels."""
  record: dict[str, Any]
  pixels: np.ndarray  # (h, w, 3) uint8 RGB


def new_entry(index: int) -> dict[str, Any]:
  """The JSON-serialisable per-image result every COCO-style protocol returns: ``counts`` holds
  this image's share of ``COUNTERS`` (and the protocol's own counters), ``results`` its COCO
  results."""
  return {'record': int(index), 'image_id': None, 'size': None, 'ok': False,
          'counts': dict.fromkeys(COUNTERS, 0), 'results': []}


def read_image(source: Sequence[dict[str, Any]], index: int, skips: Skips
               ) -> tuple[dict[str, Any], LoadedImage | None]:
  """(entry, the image) for record ``index``; the image None when it is skipped (counted in the
  entry, logged through ``skips``)."""
  entry = new_entry(index)
  counts = entry['counts']

  def skip(counter: str, why: str):
    counts[counter] += 1
    skips.skip(counter, index, why)
    return entry, None

  try:
    record = source[index]
    entry['image_id'] = int(record['image_id'])
    mask_table(record)
  except Exception as e:  # pylint: disable=broad-except  # a bad record must not stop a run
    return skip('records_unreadable', f'{type(e).__name__}: {e}')
  try:
    pixels = decode_image(record['image'])
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many kinds
    return skip('images_corrupt', f'image does not decode: {type(e).__name__}: {e}')
  entry['size'] = [int(v) for v in pixels.shape[:2]]
  table, usable, _ = usable_masks(record, pixels.shape[:2], counts)
  if not len(usable):
    return skip('images_no_usable_mask', f'{len(table.get("counts", ()))} annotations, none '
                'valid (no masks, or every one an invalid RLE, of another size or empty)')
  counts['images_ok'] = 1
  entry['ok'] = True
  return entry, LoadedImage(record, pixels)


def sum_counts(per_image: Iterable[dict[str, Any]], keys: Sequence[str]) -> dict[str, int]:
  """The per-image ``counts`` of ``keys`` added up."""
  total = dict.fromkeys(keys, 0)
  for entry in per_image:
    for k in keys:
      total[k] += entry['counts'].get(k, 0)
  return total


def evaluated_ground_truth(source: Sequence[dict[str, Any]], per_image: Sequence[dict[str, Any]],
                           name: str = 'dataset'
                           ) -> tuple[GroundTruth, list[dict[str, Any]], dict[str, int]]:
  """The ground truth of the images ``per_image`` evaluated (read again from ``source``), the
  entries it holds, and the dataset's ``COUNTERS``: an image whose record no longer reads, or whose
  image_id repeats an earlier one, is moved from images_ok to its counter and left out."""
  counts = sum_counts(per_image, COUNTERS)
  ok = sorted((e for e in per_image if e['ok']), key=lambda e: e['record'])
  kept, seen = [], set()
  for e in ok:
    if e['image_id'] in seen:
      counts['images_ok'] -= 1
      counts['images_duplicate_id'] += 1
      log.warning('%s: record %d repeats image_id %d: left out', name, e['record'], e['image_id'])
      continue
    seen.add(e['image_id'])
    kept.append(e)

  read: list[dict[str, Any]] = []  # the entries whose record was read again

  def images():
    for e in kept:
      try:
        record = source[e['record']]
      except Exception as err:  # pylint: disable=broad-except  # read fine once: flaky storage
        log.warning('%s: record %d no longer reads (%s): left out', name, e['record'], err)
        counts['images_ok'] -= 1
        counts['records_unreadable'] += 1
        continue
      read.append(e)
      yield record, e['size']

  gt = ground_truth(images())
  return gt, read, counts
