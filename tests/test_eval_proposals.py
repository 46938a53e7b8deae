"""Object proposals (``sam_jax.evaluation.proposals``): the ranking and top-k, agreement with the
official ``SamAutomaticMaskGenerator`` run with the same settings and ranked the same way (mask AR
within 1e-3), and bad records counted and skipped.

The official vit_tiny is made to give image-region masks (``amg_reference.coherent_masks``: a fully
random decoder gives whole-image texture that NMS collapses to one mask), and its NMS breaks ties
by index as ours does (see tests/test_automatic_mask_generator.py).
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from amg_reference import coherent_masks, stable_batched_nms
from conftest import PARITY_REPORT
from official_reference import official_sam, save_pth
from sam_jax import sam_model_registry
from sam_jax.data import record, synthetic_shapes
from sam_jax.evaluation import coco_eval, proposals
from sam_jax.modeling.config import VARIANTS
from sam_jax.utils.amg import rle_to_mask

torch = pytest.importorskip('torch')

SMALL_GRID = proposals.Protocol(points_per_side=12, points_per_batch=48, max_proposals=8)


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
  """(official Sam, our Sam) with the same coherent-mask random weights."""
  # A smaller logit offset than the default: more of the 12x12 grid's masks are not empty.
  ref = coherent_masks(official_sam(VARIANTS['vit_tiny'], seed=1), logit_offset=-25.0)
  path = save_pth(ref, tmp_path_factory.mktemp('proposals') / 'vit_tiny.pth')
  return ref, sam_model_registry['vit_tiny'](checkpoint=path)


def shapes_records(n: int, image_size: int = 128, seed: int = 4) -> list[dict]:
  return [synthetic_shapes.to_record(synthetic_shapes.render(
      seed, i, synthetic_shapes.ShapesSpec(image_size=image_size)), image_id=300 + i)
          for i in range(n)]


def test_rank_by_mean_of_predicted_iou_and_stability():
  records = [{'predicted_iou': a, 'stability_score': b} for a, b in
             [(0.9, 0.1), (0.2, 0.2), (0.6, 0.8), (0.3, 0.7), (0.0, 1.0), (1.0, 0.9)]]
  order, scores = proposals.rank(records, 4)
  assert order.tolist() == [5, 2, 0, 3]  # 0.95, 0.7, then 0.5 three times: record order
  np.testing.assert_allclose(scores, [0.95, 0.7, 0.5, 0.5])
  order, _ = proposals.rank(records, 100)
  assert order.tolist() == [5, 2, 0, 3, 4, 1]
  assert proposals.rank([], 10)[0].tolist() == []


def test_top_k_of_the_generator_best_first(pair):
  """The proposals are the generator's masks (no filter, NMS 0.9) with the best mean scores."""
  records = shapes_records(1)
  image = np.asarray(Image.open(io.BytesIO(records[0]['image'])).convert('RGB'))
  generator = proposals.make_generator(pair[1], SMALL_GRID)
  assert (generator.pred_iou_thresh, generator.stability_score_thresh, generator.crop_n_layers,
          generator.box_nms_thresh) == (0.0, 0.0, 0, 0.9)
  generated = generator.generate(image)
  everything = [r for r in generated if r['area'] > 0]
  assert len(everything) > SMALL_GRID.max_proposals  # the cut matters
  means = np.array([(r['predicted_iou'] + r['stability_score']) / 2 for r in everything])
  got, empty = proposals.image_proposals(generator, image, SMALL_GRID.max_proposals)
  assert empty == len(generated) - len(everything)
  assert len(got) == SMALL_GRID.max_proposals
  scores = np.array([p['score'] for p in got])
  assert (np.diff(scores) <= 0).all()
  np.testing.assert_allclose(scores, np.sort(means)[::-1][:len(got)], rtol=1e-6)
  cutoff = scores[-1]
  assert (means > cutoff).sum() <= len(got) <= (means >= cutoff).sum()
  for p in got:  # each proposal is the generator's mask of that score
    i = int(np.argmin(np.abs(means - p['score'])))
    want = rle_to_mask(everything[i]['segmentation'])  # the generator's uncompressed RLE
    assert (mask_utils.decode(p['segmentation']).astype(bool) == want).all()


def as_record(rec: dict, masks: list[np.ndarray]) -> dict:
  """``rec``'s image with ``masks`` as its ground truth."""
  entries = []
  for m in masks:
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    entries.append(record.mask_entry(r['counts'], r['size'], area=int(m.sum()), category_id=1))
  return record.make_record(rec['image'], entries, image_id=rec['image_id'], file_name='x.png',
                            height=rec['height'], width=rec['width'])


def test_proposals_match_the_official_generator(pair, monkeypatch):
  """Our proposals are the official generator's (same settings, ranked and cut the same way):
  same masks in the same order, same AR; and with all of the official masks as the ground truth,
  AR is exactly the share of them in the top k."""
  import segment_anything.automatic_mask_generator as official
  monkeypatch.setattr(official, 'batched_nms', stable_batched_nms)
  ref, ours = pair
  records = shapes_records(3)
  res = proposals.evaluate_source(ours, records, SMALL_GRID, progress=False)
  per_image = proposals.run_images(ours, records, range(3), SMALL_GRID, progress=False)
  assert json.loads(json.dumps(per_image)) == per_image  # entries travel between hosts as JSON
  generator = official.SamAutomaticMaskGenerator(
      ref, points_per_side=12, points_per_batch=48, pred_iou_thresh=0.0,
      stability_score_thresh=0.0, box_nms_thresh=0.9, crop_n_layers=0)
  want_results, model_gt, worst_iou, worst_score = [], [], 1.0, 0.0
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    for rec, entry in zip(records, per_image):
      image = np.asarray(Image.open(io.BytesIO(rec['image'])).convert('RGB'))
      with torch.no_grad():
        theirs = [r for r in generator.generate(image) if r['area'] > 0]
      assert len(theirs) > SMALL_GRID.max_proposals  # the cut matters
      model_gt.append(as_record(rec, [r['segmentation'] for r in theirs]))
      order, scores = proposals.rank(theirs, SMALL_GRID.max_proposals)
      assert len(entry['results']) == len(order)
      for r, i, s in zip(entry['results'], order, scores):
        want = theirs[i]['segmentation']
        got = mask_utils.decode(r['segmentation']).astype(bool)
        worst_iou = min(worst_iou, (got & want).sum() / max((got | want).sum(), 1))
        worst_score = max(worst_score, abs(r['score'] - s))
        want_results.append({'image_id': rec['image_id'], 'category_id': 1, 'score': float(s),
                             'segmentation': {'size': list(want.shape), 'counts': mask_utils.encode(
                                 np.asfortranarray(want.astype(np.uint8)))['counts'].decode()}})
  finally:
    torch.set_num_threads(threads)
  assert worst_iou >= 0.99 and worst_score <= 1e-3
  assert res['images'] == 3 and res['results'] == len(want_results) == 3 * SMALL_GRID.max_proposals
  assert res['proposals_per_image'] == SMALL_GRID.max_proposals
  gt = coco_eval.ground_truth((r, None) for r in records)
  want = coco_eval.mask_ar(gt.coco, want_results)
  for k in coco_eval.AR_KEYS:
    assert (res['metrics'][k] is None) == (want[k] is None), k
    if want[k] is not None:
      assert abs(res['metrics'][k] - want[k]) <= 1e-3, (k, res['metrics'], want)
  assert proposals.summarize(records, per_image, SMALL_GRID)['metrics'] == res['metrics']
  # Every official mask as ground truth: the top k of each image are found, no other.
  on_model = proposals.evaluate_source(ours, model_gt, SMALL_GRID, progress=False)
  found = 3 * SMALL_GRID.max_proposals / on_model['gt_masks']
  assert on_model['metrics']['AR@1000'] == pytest.approx(found, abs=1e-3)
  assert on_model['metrics']['AR@10'] == on_model['metrics']['AR@1000']  # 8 proposals an image
  PARITY_REPORT.append(
      f'proposals vs official generator, vit_tiny, 12x12 grid, top {SMALL_GRID.max_proposals} of '
      f'3 images: worst mask IoU {worst_iou:.4f}, |d score| {worst_score:.1e}, AR@1000 '
      f'{100 * res["metrics"]["AR@1000"]:.1f} (official {100 * want["AR@1000"]:.1f}); against all '
      f'{on_model["gt_masks"]} official masks {100 * on_model["metrics"]["AR@1000"]:.2f} '
      f'(top-k share {100 * found:.2f})')


def test_bad_records_are_counted_and_skipped(pair):
  good = shapes_records(2, seed=8)
  corrupt = dict(good[0], image=good[0]['image'][:40], image_id=1)
  no_masks = dict(good[1], masks=[], image_id=2)
  records = [good[0], corrupt, no_masks, good[1], good[0]]  # the last: an image_id seen before
  protocol = proposals.Protocol(points_per_side=4, points_per_batch=16, max_proposals=5)
  res = proposals.evaluate_source(pair[1], records, protocol, name='bad', progress=False)
  assert res['records_read'] == 5 and res['images'] == 2 and res['results'] <= 10
  assert res['skipped'] == {**dict.fromkeys(coco_eval.COUNTERS, 0), 'images_ok': 2,
                            'images_corrupt': 1, 'images_no_usable_mask': 1,
                            'images_duplicate_id': 1}
  assert res['gt_masks'] == sum(len(r['masks']) for r in good)
  json.dumps(res)  # the figures are plain JSON
  table = proposals.markdown({'shapes:validation': res, 'lvis': {'error': 'not built'}})
  assert '| shapes:validation | 2 |' in table and 'images_corrupt 1' in table
  assert '| AR@1000 | AR S@1000 | AR M@1000 | AR L@1000 | AR@100 | AR@10 |' in table
  assert '| 4x4 | 0.9 |' in table and 'error: not built' in table


def test_protocol_checks_its_settings():
  with pytest.raises(ValueError, match='must be >= 1'):
    proposals.Protocol(max_proposals=0)
