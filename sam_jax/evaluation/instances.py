"""Instance segmentation from detector boxes (SAM paper, Section 7.4 and Appendix D.4): mask AP.

The boxes of a detector (a COCO results JSON, e.g. ViTDet-H's on COCO val2017 or LVIS v1 val) are
SAM's prompts. Per image: the image is encoded once; its detections (score >= ``score_thresh``,
the ``max_detections`` best) go through the prompt encoder + decoder together, ``batch_size`` at a
time (a batch padded to a power of two, the masks' rows and columns to multiples of ``pad_to``, so
that few programs are compiled), single mask output for a box; then ONE refinement pass, on the
device in the same program: the same box plus the first pass's low-res logits as ``mask_input``
(the official ``SamPredictor.predict(box=..., mask_input=logits)``). The refined mask at the
original resolution becomes a COCO RLE result with the detector's score and category, and COCOeval
(category-aware, ``coco_eval.mask_ap``) gives mask AP, AP50, AP75, AP_S, AP_M, AP_L against the
dataset's masks (crowd regions as COCO's ignore regions).

Bad data is counted, logged and skipped, never fatal: records that do not read, images that do
not decode, records without a valid mask (``coco_eval.COUNTERS``); detections whose image_id is not
among the records read, on skipped images, with a non-finite or negative box, under the score
threshold, or past ``max_detections`` (``DETECTION_COUNTERS``). A boxes file that is not a list of
detections is an error that says so.

A driver may split the work: ``run_images`` on any subset of record indices (per host, per
device) returns JSON-serialisable per-image entries; ``summarize`` of all entries gives the figures.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import math
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from pycocotools import mask as mask_utils

from sam_jax.evaluation import coco_eval
from sam_jax.evaluation.single_point import MAX_LOGGED, Skips, image_size
from sam_jax.modeling.sam import Sam, postprocess_masks
from sam_jax.predictor import SamPredictor, assemble_prompts, padded_postprocess_weights

log = logging.getLogger(__name__)

DETECTION_COUNTERS = (
    'detections_read',               # well-formed entries of the boxes file
    'detections_used',               # became a mask result
    'detections_invalid_box',        # non-finite numbers, or negative width / height
    'detections_below_score',        # score < score_thresh
    'detections_over_max',           # past the image's max_detections best
    'detections_on_skipped_images',  # their image was skipped (see coco_eval.COUNTERS)
    'detections_unknown_image',      # image_id not among the records read
)
PER_IMAGE_COUNTERS = ('detections_used', 'detections_below_score', 'detections_over_max',
                      'detections_on_skipped_images')
GROUND_TRUTH_BOXES = 'ground_truth'
FORMAT = ('a JSON list of detections [{"image_id": int, "category_id": int, '
          '"bbox": [x, y, w, h], "score": float}, ...] (COCO results format)')
# Paper, Table 5 (SAM ViT-H prompted with ViTDet-H boxes): mask AP.
PAPER_AP = {'COCO': 46.5, 'LVIS v1': 44.7}


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Settings of the protocol."""
  boxes: str = ''                 # the detector's COCO results JSON (boxes), one per dataset, or
                                  # 'ground_truth': the dataset's own mask boxes (an oracle)
  refine: bool = True             # the second pass with the first pass's logits fed back
  batch_size: int = 128           # boxes of one image per decoder call (padded to a power of
                                  # 2): the default takes an image's 100 detections at once
  score_thresh: float = 0.0       # detections scored below are dropped
  max_detections: int = 100       # per image, the best scored (COCO's AP counts 100)
  pad_to: int = 128               # masks padded to multiples of this many rows and columns

  def __post_init__(self):
    if self.batch_size < 1 or self.max_detections < 1 or self.pad_to < 1:
      raise ValueError('batch_size, max_detections and pad_to must be >= 1')


# ---------------------------------------------------------------------------------------------
# Detections.

@dataclasses.dataclass(frozen=True)
class Detections:
  """The detections of one image, best score first (ties in file order)."""
  boxes: np.ndarray         # (n, 4) float64 [x, y, w, h] in original-image pixels
  scores: np.ndarray        # (n,) float64
  category_ids: np.ndarray  # (n,) int64


@dataclasses.dataclass(frozen=True)
class DetectionFile:
  """A boxes file grouped by image."""
  by_image: dict[int, Detections]
  counts: dict[str, int]  # detections_read, detections_invalid_box


def parse_detections(data: Any, where: str = 'boxes') -> DetectionFile:
  """Detections in the COCO results format (already parsed JSON) grouped by image_id; ValueError
  naming the problem when ``data`` is not such a list."""
  if not isinstance(data, list):
    hint = (' (this looks like a COCO annotation file; pass the detector\'s results)'
            if isinstance(data, dict) and 'annotations' in data else '')
    keys = f' with keys {sorted(data)[:8]}' if isinstance(data, dict) else ''
    raise ValueError(f'{where}: expected {FORMAT}, got a {type(data).__name__}{keys}{hint}')
  grouped = collections.defaultdict(list)
  counts = dict.fromkeys(('detections_read', 'detections_invalid_box'), 0)
  for n, d in enumerate(data):
    if not isinstance(d, dict):
      raise ValueError(f'{where}: detection {n} is a {type(d).__name__}, not an object; expected '
                       f'{FORMAT}')
    missing = [k for k in ('image_id', 'category_id', 'bbox', 'score') if k not in d]
    if missing:
      raise ValueError(f'{where}: detection {n} has no {missing} (keys {sorted(d)}); expected '
                       f'{FORMAT}')
    try:
      box = [float(v) for v in d['bbox']]
      score = float(d['score'])
      image_id, category = int(d['image_id']), int(d['category_id'])
    except (TypeError, ValueError) as e:
      raise ValueError(f'{where}: detection {n} is not numbers where {FORMAT} has them: '
                       f'{json.dumps(d)[:200]} ({e})') from e
    if len(box) != 4:
      raise ValueError(f'{where}: detection {n} has a bbox of {len(box)} numbers, not 4 '
                       '[x, y, w, h]')
    counts['detections_read'] += 1
    if not all(math.isfinite(v) for v in box + [score]) or box[2] < 0 or box[3] < 0:
      counts['detections_invalid_box'] += 1
      if counts['detections_invalid_box'] <= MAX_LOGGED:
        log.warning('%s: detection %d skipped: bbox %s, score %s', where, n, box, score)
      continue
    grouped[image_id].append((box, score, category))
  by_image = {}
  for image_id, dets in grouped.items():
    scores = np.array([s for _, s, _ in dets], np.float64)
    order = np.argsort(-scores, kind='stable')
    boxes = np.array([b for b, _, _ in dets], np.float64).reshape(-1, 4)  # (n, 4)
    categories = np.array([c for _, _, c in dets], np.int64)
    by_image[image_id] = Detections(boxes[order], scores[order], categories[order])
  return DetectionFile(by_image, counts)


def ground_truth_detections(source: Sequence[dict[str, Any]], indices: Iterable[int]
                            ) -> DetectionFile:
  """An oracle detector: the box of every valid, non-crowd mask of the records ``indices``, score
  1 and the mask's category (``boxes='ground_truth'``: box-prompt AP without a detector, e.g. on
  the synthetic shapes; unreadable records are left to ``run_images`` to count)."""
  dets = []
  for i in indices:
    try:
      record = source[i]
      table, usable, _ = coco_eval.usable_masks(record, image_size(record['image']),
                                                dict.fromkeys(coco_eval.COUNTERS, 0))
    except Exception:  # pylint: disable=broad-except  # counted when the image is evaluated
      continue
    for j in usable:
      if 'is_crowd' in table and table['is_crowd'][j]:
        continue
      counts = table['counts'][j]
      rle = {'size': [int(v) for v in table['size'][j]],
             'counts': counts.encode() if isinstance(counts, str) else bytes(counts)}
      dets.append({'image_id': int(record['image_id']), 'score': 1.0,
                   'category_id': int(table['category_id'][j]) if 'category_id' in table else 0,
                   'bbox': [float(v) for v in mask_utils.toBbox(rle)]})
  return parse_detections(dets, 'ground-truth boxes')


def load_detections(path: str, source: Sequence[dict[str, Any]] | None = None,
                    indices: Iterable[int] = ()) -> DetectionFile:
  """``parse_detections`` of a JSON file (local or any ``etils.epath`` path), or, for
  ``GROUND_TRUTH_BOXES``, ``ground_truth_detections(source, indices)``."""
  if path == GROUND_TRUTH_BOXES:
    if source is None:
      raise ValueError(f'boxes={GROUND_TRUTH_BOXES!r} needs the dataset')
    return ground_truth_detections(source, indices)
  if not path:
    raise ValueError('no boxes file: set the protocol\'s boxes (a detector\'s COCO results JSON)')
  try:
    text = epath.Path(path).read_text()
  except FileNotFoundError as e:
    raise FileNotFoundError(f'boxes file {path} does not exist') from e
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'boxes file {path} is not JSON: {e}') from e
  return parse_detections(data, f'boxes file {path}')


def select(dets: Detections, protocol: Protocol, counts: dict[str, int]) -> Detections:
  """The detections the protocol prompts with: score >= score_thresh, the max_detections best."""
  keep = dets.scores >= protocol.score_thresh
  counts['detections_below_score'] += int((~keep).sum())
  idx = np.flatnonzero(keep)  # still best first
  counts['detections_over_max'] += max(len(idx) - protocol.max_detections, 0)
  idx = idx[:protocol.max_detections]
  return Detections(dets.boxes[idx], dets.scores[idx], dets.category_ids[idx])


# ---------------------------------------------------------------------------------------------
# Masks.

@functools.lru_cache(maxsize=16)
def box_program(graphdef: nnx.GraphDef) -> Callable:
  """(state, features (1, g, g, C), image_pe, coords (B, 2, 2), labels (B, 2), postprocess
  weights, *, refine) -> (B, W', H') bool masks, transposed (column-major rows, as RLE wants them).

  Both passes in one program: the first pass's logits never leave the device."""

  def run(state, features, image_pe, coords, labels, weights, *, refine):
    model = nnx.merge(graphdef, state)
    low_res, _ = model.decode(features, coords, labels, None, multimask_output=False,
                              image_pe=image_pe)  # (B, 1, L, L)
    if refine:
      low_res, _ = model.decode(features, coords, labels, low_res[:, 0], multimask_output=False,
                                image_pe=image_pe)
    masks = postprocess_masks(low_res[:, 0], *weights) > Sam.mask_threshold  # (B, H', W')
    return jnp.swapaxes(masks, 1, 2)  # (B, W', H')

  return jax.jit(run, static_argnames='refine')


def box_masks(predictor: SamPredictor, boxes_xywh: np.ndarray, protocol: Protocol,
              program: Callable | None = None) -> list[dict[str, Any]]:
  """COCO RLEs (str counts) of the masks that the boxes (n, 4) [x, y, w, h] of the image set on
  ``predictor`` prompt (refined when ``protocol.refine``); ``program``: ``box_program`` of the
  predictor's model (looked up when None)."""
  n = len(boxes_xywh)
  if not n:
    return []
  h, w = predictor.original_size
  b = 1 << max(min(n, protocol.batch_size) - 1, 0).bit_length()  # every batch padded to b
  xyxy = np.concatenate([boxes_xywh[:, :2], boxes_xywh[:, :2] + boxes_xywh[:, 2:]], 1)  # (n, 4)
  xyxy = predictor.transform.apply_boxes(xyxy, predictor.original_size)  # the input frame
  cfg = predictor.model.config
  weights = padded_postprocess_weights(cfg.low_res_size, cfg.image_size, predictor.input_size,
                                       predictor.original_size, protocol.pad_to)
  if program is None:
    program = box_program(nnx.split(predictor.model)[0])
  state, image_pe = predictor.state, predictor.image_pe
  rles = []
  for s in range(0, n, b):
    batch = np.zeros((b, 4), np.float32)
    batch[:min(b, n - s)] = xyxy[s:s + b]
    coords, labels = assemble_prompts(None, None, batch, b)  # (b, 2, 2), (b, 2): box corners
    masks = np.asarray(program(state, predictor.features, image_pe, coords, labels, weights,
                               refine=protocol.refine))  # (b, W', H')
    masks = np.ascontiguousarray(masks[:n - s, :w, :h]).view(np.uint8)  # (k, w, h)
    encoded = mask_utils.encode(masks.transpose(2, 1, 0))  # (h, w, k), Fortran order
    rles += [{'size': [int(v) for v in r['size']], 'counts': r['counts'].decode()}
             for r in encoded]
  return rles


# ---------------------------------------------------------------------------------------------
# Datasets.

def run_images(model_or_predictor, source: Sequence[dict[str, Any]], indices, protocol: Protocol,
               *, name: str = 'dataset', progress: bool = True,
               detections: DetectionFile | None = None) -> list[dict[str, Any]]:
  """The protocol on the records ``indices`` of ``source``: per image a JSON-serialisable entry
  (``coco_eval.new_entry``: record, image_id, size, ok, counts, results). ``detections``: the
  boxes file already loaded (read from ``protocol.boxes`` when None)."""
  from tqdm import tqdm
  predictor = (model_or_predictor if isinstance(model_or_predictor, SamPredictor)
               else SamPredictor(model_or_predictor))
  if detections is None:
    indices = list(indices)
    detections = load_detections(protocol.boxes, source, indices)
  program = box_program(nnx.split(predictor.model)[0])
  skips = Skips(name)
  out, num_results = [], 0
  bar = tqdm(list(indices), desc=name, unit='img', disable=not progress, dynamic_ncols=True)
  for i in bar:
    entry, image = coco_eval.read_image(source, int(i), skips)
    counts = entry['counts']
    counts.update(dict.fromkeys(PER_IMAGE_COUNTERS, 0))
    out.append(entry)
    dets = detections.by_image.get(entry['image_id'])
    if dets is None:
      continue
    if image is None:
      counts['detections_on_skipped_images'] = len(dets.scores)
      continue
    chosen = select(dets, protocol, counts)
    if len(chosen.scores):
      predictor.set_image(image.pixels)
      rles = box_masks(predictor, chosen.boxes, protocol, program)
      predictor.reset_image()
      entry['results'] = [
          {'image_id': entry['image_id'], 'category_id': int(c), 'segmentation': rle,
           'score': float(s)} for rle, s, c in zip(rles, chosen.scores, chosen.category_ids)]
    counts['detections_used'] = len(entry['results'])
    num_results += len(entry['results'])
    bar.set_postfix(masks=num_results)
  bar.close()
  if skips.logged > MAX_LOGGED:
    log.warning('%s: %d skipped records in all (the first %d logged)', name, skips.logged,
                MAX_LOGGED)
  return out


def summarize(source: Sequence[dict[str, Any]], per_image: Sequence[dict[str, Any]],
              protocol: Protocol, *, name: str = 'dataset',
              detections: DetectionFile | None = None) -> dict[str, Any]:
  """Mask AP of all ``per_image`` entries (from any number of ``run_images`` calls) against the
  ground truth of the images they evaluated: images, skipped (``coco_eval.COUNTERS``),
  detections (``DETECTION_COUNTERS``), gt_masks, gt_crowd, results, metrics (``AP_KEYS``)."""
  if detections is None:
    detections = load_detections(protocol.boxes, source, [e['record'] for e in per_image])
  gt, kept, skipped = coco_eval.evaluated_ground_truth(source, per_image, name)
  results = coco_results(kept)
  dets = {**coco_eval.sum_counts(per_image, DETECTION_COUNTERS), **detections.counts}
  dropped = dets['detections_used'] - len(results)  # images left out of the ground truth
  dets['detections_used'] -= dropped
  dets['detections_on_skipped_images'] += dropped
  seen = {e['image_id'] for e in per_image}
  unknown = [k for k in detections.by_image if k not in seen]
  dets['detections_unknown_image'] = sum(len(detections.by_image[k].scores) for k in unknown)
  if unknown:
    log.warning('%s: %d detections on %d image ids not among the records read, e.g. %s', name,
                dets['detections_unknown_image'], len(unknown), sorted(unknown)[:5])
  return {'images': skipped['images_ok'], 'skipped': skipped, 'detections': dets,
          'gt_masks': gt.num_masks, 'gt_crowd': gt.num_crowd, 'results': len(results),
          'metrics': coco_eval.mask_ap(gt.coco, results)}


def evaluate_source(model_or_predictor, source: Sequence[dict[str, Any]],
                    protocol: Protocol = Protocol(), *, name: str = 'dataset', max_images: int = 0,
                    progress: bool = True) -> dict[str, Any]:
  """The protocol over a random-access source of records (the first ``max_images`` when > 0):
  ``summarize``'s figures plus records_read, seconds and the protocol."""
  start = time.time()
  num_records = len(source) if not max_images else min(len(source), max_images)
  detections = load_detections(protocol.boxes, source, range(num_records))
  per_image = run_images(model_or_predictor, source, range(num_records), protocol, name=name,
                         progress=progress, detections=detections)
  out = summarize(source, per_image, protocol, name=name, detections=detections)
  m = out['metrics']
  log.info('%s: mask AP %s (AP_S %s, AP_M %s, AP_L %s) from %d masks on %d images', name,
           *(_pct(m[k]) for k in ('AP', 'AP_S', 'AP_M', 'AP_L')), out['results'], out['images'])
  return {'records_read': num_records, **out, 'seconds': round(time.time() - start, 2),
          'protocol': dataclasses.asdict(protocol)}


def coco_results(per_image: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Every mask result of ``per_image`` as one COCO results list (for a results JSON file)."""
  return [r for e in per_image for r in e['results']]


# ---------------------------------------------------------------------------------------------
# Report.

def _pct(v: float | None) -> str:
  return '-' if v is None else f'{100 * v:.1f}'


def markdown(results_by_dataset: dict[str, dict[str, Any]]) -> str:
  """The paper's Table 5 layout: mask AP (%) by dataset, then what was read and skipped."""
  lines = ['# Instance segmentation from detector boxes', '',
           'Mask AP (%), COCOeval (category-aware, 100 detections per image): each detector box '
           'prompts SAM (single mask output), then one refinement pass with the box and the '
           'first mask\'s logits. Paper (SAM ViT-H, ViTDet-H boxes): '
           + ', '.join(f'{k} {v}' for k, v in PAPER_AP.items()) + '.', '',
           '| dataset | images | masks | ' + ' | '.join(coco_eval.AP_KEYS) + ' |',
           '|---|---:|---:|' + '---:|' * len(coco_eval.AP_KEYS)]
  for name, res in results_by_dataset.items():
    if 'metrics' in res:
      lines.append(f'| {name} | {res["images"]} | {res["results"]} | '
                   + ' | '.join(_pct(res['metrics'][k]) for k in coco_eval.AP_KEYS) + ' |')
  lines += ['', '| dataset | boxes | refine | records read | gt masks (crowd) | detections used / '
            'read | skipped | seconds |', '|---|---|:---:|---:|---:|---:|---|---:|']
  for name, res in results_by_dataset.items():
    if 'error' in res:
      lines.append(f'| {name} | - | - | - | - | - | error: {res["error"].splitlines()[0]} | - |')
      continue
    d, p = res['detections'], res.get('protocol', {})
    skipped = ', '.join(f'{k} {v}' for k, v in {**res['skipped'], **d}.items()
                        if v and k not in ('images_ok', 'detections_read', 'detections_used'))
    lines.append(f'| {name} | `{p.get("boxes", "")}` | {"yes" if p.get("refine") else "no"} | '
                 f'{res["records_read"]} | {res["gt_masks"]} ({res["gt_crowd"]}) | '
                 f'{d["detections_used"]} / {d["detections_read"]} | {skipped or "none"} | '
                 f'{res["seconds"]:.0f} |')
  return '\n'.join(lines) + '\n'
