"""Object proposals (SAM paper, Section 7.3 and Appendix D.3): class-agnostic mask AR@1000.

Per image, this repository's ``SamAutomaticMaskGenerator`` (the official generator's pipeline)
with the paper's settings: a 64x64 grid of single-point prompts, no crops, no predicted-IoU or
stability filter (thresholds 0), greedy box NMS at IoU 0.9. The masks left are ranked by the mean
of their predicted IoU and stability score, and the best ``max_proposals`` (1000) are the image's
proposals, scored by that mean (empty masks, which match nothing, are left out). COCOeval,
class-agnostic (``coco_eval.mask_ar``), gives mask AR@10, @100, @1000 and AR_S / AR_M / AR_L
@1000 against the dataset's masks (crowd regions ignored).

Bad records are counted, logged and skipped (``coco_eval.COUNTERS``). A driver may split the
work: ``run_images`` on any subset of record indices returns JSON-serialisable per-image entries;
``summarize`` of all entries gives the figures. Memory: every proposal's RLE is kept until
COCOeval runs (LVIS v1 val: ~20k images x 1000 RLEs).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Sequence

import numpy as np

from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
from sam_jax.evaluation import coco_eval
from sam_jax.evaluation.single_point import MAX_LOGGED, Skips
from sam_jax.predictor import SamPredictor
from sam_jax.utils.amg import coco_encode_rle

log = logging.getLogger(__name__)

CATEGORY_ID = 1  # every proposal's (COCOeval reads no category with useCats=0)
PAPER_AR = {'LVIS v1': 59.3}  # Paper, Table 4: SAM ViT-H, mask AR@1000


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Settings of the protocol."""
  points_per_side: int = 64       # grid of single-point prompts (points_per_side ** 2 of them)
  points_per_batch: int = 64      # prompts decoded at once
  nms_thresh: float = 0.9         # box IoU above which NMS drops the lower-scored mask
  max_proposals: int = 1000       # per image, the best ranked

  def __post_init__(self):
    if self.points_per_side < 1 or self.points_per_batch < 1 or self.max_proposals < 1:
      raise ValueError('points_per_side, points_per_batch and max_proposals must be >= 1')


def make_generator(model_or_predictor, protocol: Protocol) -> SamAutomaticMaskGenerator:
  """The automatic mask generator with the protocol's settings (no filter, no crops)."""
  model = (model_or_predictor.model if isinstance(model_or_predictor, SamPredictor)
           else model_or_predictor)
  return SamAutomaticMaskGenerator(
      model, points_per_side=protocol.points_per_side, points_per_batch=protocol.points_per_batch,
      pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=protocol.nms_thresh,
      crop_n_layers=0, output_mode='uncompressed_rle')


def rank(records: Sequence[dict[str, Any]], max_proposals: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices of the best ``max_proposals`` generator records, best first (ties in record order),
  their scores: the mean of predicted IoU and stability score)."""
  scores = np.array([(r['predicted_iou'] + r['stability_score']) / 2 for r in records],
                    np.float64).reshape(-1)  # (n,)
  order = np.argsort(-scores, kind='stable')[:max_proposals]
  return order, scores[order]


def image_proposals(generator: SamAutomaticMaskGenerator, image: np.ndarray, max_proposals: int
                    ) -> tuple[list[dict[str, Any]], int]:
  """(the proposals of an (h, w, 3) uint8 image: [{"segmentation": COCO RLE (str counts),
  "score"}] best first, the number of empty masks left out). An empty mask matches nothing and
  its stability score may be 0 / 0, so it is not a proposal."""
  records = generator.generate(image)
  masks = [r for r in records if r['area'] > 0]
  order, scores = rank(masks, max_proposals)
  return ([{'segmentation': coco_encode_rle(masks[i]['segmentation']), 'score': float(s)}
           for i, s in zip(order, scores)], len(records) - len(masks))


def run_images(model_or_predictor, source: Sequence[dict[str, Any]], indices, protocol: Protocol,
               *, name: str = 'dataset', progress: bool = True) -> list[dict[str, Any]]:
  """The protocol on the records ``indices`` of ``source``: per image a JSON-serialisable entry
  (``coco_eval.new_entry``: record, image_id, size, ok, counts, results)."""
  from tqdm import tqdm
  generator = (model_or_predictor if isinstance(model_or_predictor, SamAutomaticMaskGenerator)
               else make_generator(model_or_predictor, protocol))
  skips = Skips(name)
  out, num_results = [], 0
  bar = tqdm(list(indices), desc=name, unit='img', disable=not progress, dynamic_ncols=True)
  for i in bar:
    entry, image = coco_eval.read_image(source, int(i), skips)
    out.append(entry)
    if image is None:
      continue
    found, empty = image_proposals(generator, image.pixels, protocol.max_proposals)
    entry['counts']['proposals_empty'] = empty
    entry['results'] = [{'image_id': entry['image_id'], 'category_id': CATEGORY_ID, **p}
                        for p in found]
    num_results += len(entry['results'])
    bar.set_postfix(per_image=f'{num_results / sum(e["ok"] for e in out):.0f}')
  bar.close()
  if skips.logged > MAX_LOGGED:
    log.warning('%s: %d skipped records in all (the first %d logged)', name, skips.logged,
                MAX_LOGGED)
  return out


def summarize(source: Sequence[dict[str, Any]], per_image: Sequence[dict[str, Any]],
              protocol: Protocol, *, name: str = 'dataset') -> dict[str, Any]:
  """Mask AR of all ``per_image`` entries (from any number of ``run_images`` calls) against the
  ground truth of the images they evaluated: images, skipped (``coco_eval.COUNTERS``), gt_masks,
  gt_crowd, results, empty_masks (generated, not proposed), proposals_per_image, metrics
  (``coco_eval.AR_KEYS``)."""
  del protocol  # the entries hold the proposals already cut to max_proposals
  gt, kept, skipped = coco_eval.evaluated_ground_truth(source, per_image, name)
  results = [r for e in kept for r in e['results']]
  return {'images': skipped['images_ok'], 'skipped': skipped, 'gt_masks': gt.num_masks,
          'gt_crowd': gt.num_crowd, 'results': len(results),
          'empty_masks': sum(e['counts'].get('proposals_empty', 0) for e in kept),
          'proposals_per_image': round(len(results) / max(len(kept), 1), 1),
          'metrics': coco_eval.mask_ar(gt.coco, results)}


def evaluate_source(model_or_predictor, source: Sequence[dict[str, Any]],
                    protocol: Protocol = Protocol(), *, name: str = 'dataset', max_images: int = 0,
                    progress: bool = True) -> dict[str, Any]:
  """The protocol over a random-access source of records (the first ``max_images`` when > 0):
  ``summarize``'s figures plus records_read, seconds and the protocol."""
  start = time.time()
  num_records = len(source) if not max_images else min(len(source), max_images)
  per_image = run_images(model_or_predictor, source, range(num_records), protocol, name=name,
                         progress=progress)
  out = summarize(source, per_image, protocol, name=name)
  m = out['metrics']
  log.info('%s: mask AR@1000 %s (S %s, M %s, L %s), AR@100 %s, AR@10 %s; %.0f proposals per '
           'image on %d images', name, *(_pct(m[k]) for k in (
               'AR@1000', 'AR_S@1000', 'AR_M@1000', 'AR_L@1000', 'AR@100', 'AR@10')),
           out['proposals_per_image'], out['images'])
  return {'records_read': num_records, **out, 'seconds': round(time.time() - start, 2),
          'protocol': dataclasses.asdict(protocol)}


# ---------------------------------------------------------------------------------------------
# Report.

def _pct(v: float | None) -> str:
  return '-' if v is None else f'{100 * v:.1f}'


def markdown(results_by_dataset: dict[str, dict[str, Any]]) -> str:
  """The paper's Table 4 layout: mask AR (%) by dataset, then what was read and skipped."""
  keys = ('AR@1000', 'AR_S@1000', 'AR_M@1000', 'AR_L@1000', 'AR@100', 'AR@10')
  lines = ['# Object proposals', '',
           'Class-agnostic mask AR (%), COCOeval (useCats=0), IoU .50:.95: the automatic mask '
           'generator with a 64x64 grid (or as set below), no IoU / stability filter, box NMS 0.9, '
           'ranked by the mean of predicted IoU and stability score. Paper (SAM ViT-H), '
           'AR@1000: ' + ', '.join(f'{k} {v}' for k, v in PAPER_AR.items()) + '.', '',
           '| dataset | images | ' + ' | '.join(k.replace('_', ' ') for k in keys) + ' |',
           '|---|---:|' + '---:|' * len(keys)]
  for name, res in results_by_dataset.items():
    if 'metrics' in res:
      lines.append(f'| {name} | {res["images"]} | '
                   + ' | '.join(_pct(res['metrics'][k]) for k in keys) + ' |')
  lines += ['', '| dataset | grid | NMS | records read | gt masks (crowd) | proposals per image | '
            'skipped | seconds |', '|---|---:|---:|---:|---:|---:|---|---:|']
  for name, res in results_by_dataset.items():
    if 'error' in res:
      lines.append(f'| {name} | - | - | - | - | - | error: {res["error"].splitlines()[0]} | - |')
      continue
    p = res.get('protocol', {})
    n = p.get('points_per_side', '-')
    skipped = ', '.join(f'{k} {v}' for k, v in res['skipped'].items() if v and k != 'images_ok')
    lines.append(f'| {name} | {n}x{n} | {p.get("nms_thresh", "-")} | '
                 f'{res["records_read"]} | {res["gt_masks"]} ({res["gt_crowd"]}) | '
                 f'{res["proposals_per_image"]} | {skipped or "none"} | {res["seconds"]:.0f} |')
  return '\n'.join(lines) + '\n'
