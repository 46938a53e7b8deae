"""COCO mask metrics (``sam_jax.evaluation.coco_eval``) on cases whose answer is known by
construction, and instance segmentation from detector boxes (``sam_jax.evaluation.instances``)
end to end: parity with the official ``SamPredictor`` (box, then box + the first mask's logits) on
the same random vit_tiny weights, and bad data counted and skipped through a built COCO-format
dataset.
"""
from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from conftest import PARITY_REPORT
from official_reference import official_sam, save_pth
from sam_jax import SamPredictor, sam_model_registry
from sam_jax.data import record, synthetic_shapes
from sam_jax.evaluation import coco_eval, instances
from sam_jax.modeling.config import VARIANTS

H, W = 160, 120  # the image of the constructed cases (non-square)
AP_101 = 51 / 101  # COCO's 101-point AP when precision is 1 up to recall 0.5 and 0 after


def png_bytes(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG')
  return buf.getvalue()


def rle(mask: np.ndarray) -> dict:
  r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {'size': [int(v) for v in r['size']], 'counts': r['counts'].decode()}


def rect(y0: int, x0: int, y1: int, x1: int, hw=(H, W)) -> np.ndarray:
  m = np.zeros(hw, bool)
  m[y0:y1, x0:x1] = True
  return m


def make_record(image_id: int, masks, categories=None, crowd=None, hw=(H, W), image=None):
  entries = []
  for j, m in enumerate(masks):
    r = rle(m)
    entries.append(record.mask_entry(
        r['counts'], r['size'], area=int(m.sum()), category_id=(categories or [1] * len(masks))[j],
        is_crowd=bool((crowd or [False] * len(masks))[j]), id=image_id * 100 + j))
  data = image if image is not None else png_bytes(np.zeros((*hw, 3), np.uint8))
  return record.make_record(data, entries, image_id=image_id, file_name=f'{image_id}.png',
                            height=hw[0], width=hw[1])


def result(image_id: int, mask: np.ndarray, score: float, category: int = 1) -> dict:
  return {'image_id': image_id, 'category_id': category, 'segmentation': rle(mask), 'score': score}


SMALL, MEDIUM, LARGE = rect(0, 0, 10, 10), rect(20, 20, 60, 60), rect(60, 10, 160, 110)  # 100,
# 1600 and 10000 px: COCO's small (< 32^2), medium and large (> 96^2)


# ------------------------------------------------------------------------------------------------
# COCOeval on cases known by construction.

def test_perfect_results_give_one_and_empty_results_zero(capsys):
  records = [make_record(1, [SMALL, MEDIUM, LARGE], categories=[1, 2, 3]),
             make_record(2, [MEDIUM, rect(0, 60, 30, 100)], categories=[2, 2])]
  gt = coco_eval.ground_truth((r, None) for r in records)
  assert gt.num_masks == 5 and gt.counts['images_ok'] == 2 and gt.num_crowd == 0
  perfect = [result(r['image_id'], mask_utils.decode(
      {'size': m['size'].tolist(), 'counts': m['counts']}).astype(bool), 1.0, m['category_id'])
             for r in records for m in r['masks']]
  ap = coco_eval.mask_ap(gt.coco, perfect)
  ar = coco_eval.mask_ar(gt.coco, perfect)
  assert sorted(ap) == sorted(coco_eval.AP_KEYS) and sorted(ar) == sorted(coco_eval.AR_KEYS)
  np.testing.assert_allclose(list(ap.values()) + list(ar.values()), 1.0, atol=1e-12)
  assert coco_eval.mask_ap(gt.coco, []) == dict.fromkeys(coco_eval.AP_KEYS, 0.0)
  assert coco_eval.mask_ar(gt.coco, []) == dict.fromkeys(coco_eval.AR_KEYS, 0.0)
  # No ground truth at all: nothing to average, so undefined rather than 0.
  empty = coco_eval.ground_truth([(make_record(3, []), None)])
  assert coco_eval.mask_ap(empty.coco, []) == dict.fromkeys(coco_eval.AP_KEYS)
  assert capsys.readouterr().out == ''  # pycocotools' prints went to the log


def test_half_wrong_results_give_exact_ap_and_ar():
  gt = coco_eval.ground_truth([(make_record(1, [MEDIUM, LARGE]), None)])
  wrong = rect(0, 70, 15, 120)  # disjoint from both
  right_first = [result(1, MEDIUM, 0.9), result(1, wrong, 0.8)]
  wrong_first = [result(1, MEDIUM, 0.8), result(1, wrong, 0.9)]
  # Recall 0.5 at every IoU threshold; precision 1 (right first) or 0.5 (wrong first) up to it.
  assert coco_eval.mask_ap(gt.coco, right_first)['AP'] == pytest.approx(AP_101, abs=1e-12)
  assert coco_eval.mask_ap(gt.coco, wrong_first)['AP'] == pytest.approx(AP_101 / 2, abs=1e-12)
  ar = coco_eval.mask_ar(gt.coco, wrong_first)
  assert ar['AR@1000'] == pytest.approx(0.5) and ar['AR_M@1000'] == 1.0 and ar['AR_L@1000'] == 0.0
  # Half a mask right: IoU 0.5 is a match at threshold .50 only (1 of 10 thresholds).
  half = coco_eval.mask_ar(gt.coco, [result(1, rect(20, 20, 60, 40), 1.0)])
  assert half['AR_M@1000'] == pytest.approx(0.1) and half['AR@1000'] == pytest.approx(0.05)


def test_ar_by_size_and_by_number_of_proposals():
  gt = coco_eval.ground_truth([(make_record(1, [SMALL, MEDIUM, LARGE]), None)])
  ar = coco_eval.mask_ar(gt.coco, [result(1, SMALL, 0.5), result(1, LARGE, 0.4)])
  assert ar['AR_S@1000'] == 1.0 and ar['AR_M@1000'] == 0.0 and ar['AR_L@1000'] == 1.0
  assert ar['AR@1000'] == pytest.approx(2 / 3)
  # The medium mask ranked 11th: found by the best 100, not by the best 10.
  decoys = [result(1, rect(0, 100 + k % 2, 5, 120), 0.9 - k / 100) for k in range(10)]
  ar = coco_eval.mask_ar(gt.coco, decoys + [result(1, MEDIUM, 0.1)])
  assert ar['AR@10'] == 0.0 and ar['AR@100'] == ar['AR@1000'] == pytest.approx(1 / 3)
  # Sizes without ground truth are undefined (None), not 0.
  only_small = coco_eval.ground_truth([(make_record(2, [SMALL]), None)])
  ar = coco_eval.mask_ar(only_small.coco, [result(2, SMALL, 1.0)])
  assert ar['AR_S@1000'] == 1.0 and ar['AR_M@1000'] is None and ar['AR_L@1000'] is None
  assert coco_eval.mask_ar(only_small.coco, []) == {**dict.fromkeys(coco_eval.AR_KEYS, 0.0),
                                                     'AR_M@1000': None, 'AR_L@1000': None}
  ap = coco_eval.mask_ap(only_small.coco, [])
  assert ap['AP'] == ap['AP_S'] == 0.0 and ap['AP_M'] is None


def test_categories_count_for_ap_not_for_ar():
  gt = coco_eval.ground_truth([(make_record(1, [MEDIUM, LARGE], categories=[4, 5]), None)])
  swapped = [result(1, MEDIUM, 0.9, category=5), result(1, LARGE, 0.8, category=4)]
  assert coco_eval.mask_ap(gt.coco, swapped)['AP'] == 0.0
  assert coco_eval.mask_ar(gt.coco, swapped)['AR@1000'] == 1.0


def test_crowd_regions_are_ignored():
  crowd = rect(100, 0, 160, 120)
  gt = coco_eval.ground_truth([(make_record(1, [MEDIUM, crowd], crowd=[False, True]), None)])
  assert gt.num_masks == 2 and gt.num_crowd == 1
  # A detection inside the crowd region, scored first, is neither a true nor a false positive
  # (left out of the ground truth, it would be a false positive: AP 0.5).
  dets = [result(1, rect(110, 0, 160, 60), 0.9), result(1, MEDIUM, 0.5)]
  assert coco_eval.mask_ap(gt.coco, dets)['AP'] == pytest.approx(1.0)
  assert coco_eval.mask_ar(gt.coco, dets)['AR@1000'] == pytest.approx(1.0)
  no_crowd = coco_eval.ground_truth([(make_record(1, [MEDIUM]), None)])
  assert coco_eval.mask_ap(no_crowd.coco, dets)['AP'] == pytest.approx(0.5)


def test_ground_truth_boxes_are_the_masks_own():
  """boxes='ground_truth': one detection per valid non-crowd mask, its tight box, score 1."""
  crowd = rect(100, 0, 160, 120)
  records = [make_record(1, [MEDIUM, crowd, SMALL], categories=[3, 1, 4],
                         crowd=[False, True, False]),
             make_record(2, [LARGE]), make_record(3, [], image=b'not an image')]
  dets = instances.load_detections(instances.GROUND_TRUTH_BOXES, records, range(3))
  assert sorted(dets.by_image) == [1, 2] and dets.counts['detections_read'] == 3
  first = dets.by_image[1]
  assert sorted(map(tuple, first.boxes.tolist())) == [(0, 0, 10, 10), (20, 20, 40, 40)]
  assert sorted(first.category_ids.tolist()) == [3, 4] and first.scores.tolist() == [1.0, 1.0]
  assert dets.by_image[2].boxes.tolist() == [[10, 60, 100, 100]]
  with pytest.raises(ValueError, match='needs the dataset'):
    instances.load_detections(instances.GROUND_TRUTH_BOXES)


def test_ground_truth_leaves_out_bad_masks_and_images():
  good = make_record(1, [MEDIUM, LARGE])
  good['masks'][1]['area'] = 0  # no area in the source: the RLE's pixel count is used
  good['masks'].append(dict(good['masks'][0], counts='!!'))  # malformed RLE
  other = rle(rect(20, 20, 60, 60, (H, W + 1)))
  good['masks'].append(dict(good['masks'][0], counts=other['counts'],
                            size=np.array(other['size'], np.int32)))  # valid, of another size
  empty = rle(np.zeros((H, W), bool))
  good['masks'].append(dict(good['masks'][0], counts=empty['counts']))  # zero area
  corrupt = make_record(2, [MEDIUM], image=b'\x00' * 50)
  duplicate = make_record(1, [SMALL])
  gt = coco_eval.ground_truth((r, None) for r in (good, corrupt, duplicate))
  assert gt.counts == {**dict.fromkeys(coco_eval.COUNTERS, 0), 'images_ok': 1,
                       'images_corrupt': 1, 'images_duplicate_id': 1, 'masks_invalid_rle': 1,
                       'masks_size_mismatch': 1, 'masks_empty': 1}
  assert gt.image_ids == {1}
  assert [a['area'] for a in gt.coco.dataset['annotations']] == [1600, 10000]
  # A size given for the decoded image is what masks are checked against.
  gt = coco_eval.ground_truth([(make_record(1, [MEDIUM]), (H, W + 1))])
  assert gt.num_masks == 0 and gt.counts['masks_size_mismatch'] == 1


def test_results_must_belong_to_the_ground_truth():
  gt = coco_eval.ground_truth([(make_record(1, [MEDIUM]), None)])
  with pytest.raises(ValueError, match=r'not in the ground truth, e\.g\. \[7\]'):
    coco_eval.mask_ap(gt.coco, [result(7, MEDIUM, 1.0)])
  with pytest.raises(ValueError, match='"segmentation"'):
    coco_eval.mask_ar(gt.coco, [{'image_id': 1, 'score': 1.0, 'bbox': [0, 0, 1, 1]}])


# ------------------------------------------------------------------------------------------------
# Instance segmentation from boxes: parity with the official predictor.

@pytest.fixture(scope='module')
def models(tmp_path_factory):
  """The official vit_tiny with random weights, and ours loaded from its .pth."""
  ref = official_sam(VARIANTS['vit_tiny'], seed=1)
  path = save_pth(ref, tmp_path_factory.mktemp('instances') / 'vit_tiny.pth')
  return ref, sam_model_registry['vit_tiny'](checkpoint=path)


def shapes_records(n: int, image_size: int = 96, seed: int = 11) -> list[dict]:
  return [synthetic_shapes.to_record(synthetic_shapes.render(
      seed, i, synthetic_shapes.ShapesSpec(image_size=image_size)), image_id=200 + i)
          for i in range(n)]


def detector_boxes(records: list[dict], seed: int = 0) -> list[dict]:
  """A fake detector: every mask's box moved by up to 3 px with its category, plus a stray box of
  a random category per image, random scores."""
  rng = np.random.default_rng(seed)
  out = []
  for rec in records:
    h, w = rec['height'], rec['width']
    for m in rec['masks']:
      x, y, bw, bh = mask_utils.toBbox({'size': m['size'].tolist(), 'counts': m['counts']})
      x0, y0 = np.clip([x, y] + rng.integers(-3, 4, 2), 0, [w - 1, h - 1])
      x1, y1 = np.clip([x + bw, y + bh] + rng.integers(-3, 4, 2), [x0 + 1, y0 + 1], [w, h])
      out.append({'image_id': rec['image_id'], 'category_id': int(m['category_id']),
                  'bbox': [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                  'score': float(rng.uniform(0.05, 1))})
    out.append({'image_id': rec['image_id'], 'category_id': int(rng.integers(1, 6)),
                'bbox': [5.0, 7.0, w / 3, h / 4], 'score': float(rng.uniform(0.05, 1))})
  return out


def official_masks(predictor, image: np.ndarray, boxes_xywh: np.ndarray, refine: bool):
  """The protocol around the official predictor, one box at a time: (k, h, w) bool."""
  import torch
  with torch.no_grad():
    predictor.set_image(image)
    out = []
    for x, y, w, h in boxes_xywh:
      box = np.array([x, y, x + w, y + h])
      masks, _, logits = predictor.predict(box=box, multimask_output=False)
      if refine:
        masks, _, _ = predictor.predict(box=box, mask_input=logits, multimask_output=False)
      out.append(masks[0])
  return np.stack(out)


def decode_results(per_image: list[dict]) -> np.ndarray:
  """Every result mask, flattened and concatenated (images differ in size): (total pixels,)."""
  return np.concatenate([mask_utils.decode(r['segmentation']).astype(bool).reshape(-1)
                         for e in per_image for r in e['results']])


def test_instances_match_the_official_predictor(models, tmp_path):
  """Same masks as the official predictor (box, then box + logits), pixel for pixel; and, with
  the official refined masks as the ground truth, AP 1 for them and for ours."""
  import torch
  from segment_anything import SamPredictor as OfficialPredictor
  ref_model, ours = models
  records = shapes_records(3)
  boxes = detector_boxes(records)
  path = tmp_path / 'boxes.json'
  path.write_text(json.dumps(boxes))
  detections = instances.load_detections(str(path)).by_image
  predictor = SamPredictor(ours)
  official = OfficialPredictor(ref_model)
  images = [np.asarray(Image.open(io.BytesIO(r['image'])).convert('RGB')) for r in records]
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # 2 threads on 2 busy cores: much slower here (spinning workers)
  try:
    theirs = {refine: [official_masks(official, im, detections[r['image_id']].boxes, refine)
                       for im, r in zip(images, records)] for refine in (True, False)}
  finally:
    torch.set_num_threads(threads)
  mine, report = {}, []
  for refine in (True, False):
    # batch_size 4 < boxes per image: several padded batches per image.
    protocol = instances.Protocol(boxes=str(path), refine=refine, batch_size=4)
    per_image = instances.run_images(predictor, records, range(3), protocol, progress=False)
    mine[refine] = got = decode_results(per_image)
    want = np.concatenate([m.reshape(-1) for masks in theirs[refine] for m in masks])
    assert got.shape == want.shape
    ious = []
    for rec, entry, want_masks in zip(records, per_image, theirs[refine]):
      dets = detections[rec['image_id']]
      assert entry['size'] == [rec['height'], rec['width']] and entry['ok']
      assert len(entry['results']) == len(want_masks) == len(dets.scores)
      for r, w in zip(entry['results'], want_masks):
        g = mask_utils.decode(r['segmentation']).astype(bool)
        assert g.shape == w.shape
        ious.append((g & w).sum() / max((g | w).sum(), 1))
      assert [r['score'] for r in entry['results']] == dets.scores.tolist()  # best first
      assert [r['category_id'] for r in entry['results']] == dets.category_ids.tolist()
      assert all(r['image_id'] == rec['image_id'] for r in entry['results'])
    iou = np.array(ious)
    assert (got != want).mean() <= 1e-3 and iou.min() >= 0.99, iou.min()
    report.append(f'refine={refine}: {(got != want).sum()} of {got.size} pixels differ, worst '
                  f'mask IoU {iou.min():.4f}')
  assert (mine[True] != mine[False]).mean() > 0.01  # the refinement pass changes masks
  # The official refined masks as ground truth, with the detections' categories.
  model_gt = []
  for im, rec, masks in zip(images, records, theirs[True]):
    dets = detections[rec['image_id']]
    model_gt.append(make_record(rec['image_id'], list(masks), categories=dets.category_ids.tolist(),
                                hw=im.shape[:2], image=rec['image']))
  protocol = instances.Protocol(boxes=str(path), batch_size=4)
  res = instances.evaluate_source(predictor, model_gt, protocol, progress=False)
  assert res['images'] == 3 and res['gt_masks'] == res['results'] == len(boxes)
  assert res['detections']['detections_used'] == len(boxes)
  assert res['metrics']['AP50'] == pytest.approx(1.0) and res['metrics']['AP'] >= 0.98
  unrefined = instances.evaluate_source(predictor, model_gt, dataclasses.replace(
      protocol, refine=False), progress=False)
  assert unrefined['metrics']['AP'] < res['metrics']['AP'] - 0.05
  PARITY_REPORT.append(f'instances from boxes vs official, vit_tiny, {len(boxes)} boxes: '
                       + '; '.join(report) + f'; AP against the official refined masks '
                       f'{100 * res["metrics"]["AP"]:.1f} (unrefined '
                       f'{100 * unrefined["metrics"]["AP"]:.1f})')


# ------------------------------------------------------------------------------------------------
# Bad data, through a built COCO-format dataset; the boxes file's checks.

@pytest.fixture(scope='module')
def coco_dataset(tmp_path_factory):
  """A coco_format dataset (built by the project's builder) with bad records, and its boxes."""
  from sam_jax.data import build, sources
  root = tmp_path_factory.mktemp('coco_bad')
  (root / 'images').mkdir()
  shapes = [synthetic_shapes.render(3, i, synthetic_shapes.ShapesSpec(image_size=80))
            for i in range(3)]
  images, annotations = [], []
  for i, s in enumerate(shapes):
    h, w = s.image.shape[:2]
    data = png_bytes(s.image)
    if i == 2:
      data = data[:len(data) // 3]  # header reads, pixels do not
    (root / 'images' / f'{i}.png').write_bytes(data)
    images.append({'id': i + 1, 'file_name': f'{i}.png', 'height': h, 'width': w})
    for j, m in enumerate(s.masks):
      annotations.append({'id': 100 * (i + 1) + j, 'image_id': i + 1, 'category_id': j % 2 + 1,
                          'iscrowd': 0, 'bbox': [0, 0, 1, 1], 'area': int(m.sum()),
                          'segmentation': rle(m)})
  h0, w0 = shapes[0].image.shape[:2]
  annotations.append({'id': 99, 'image_id': 1, 'category_id': 1, 'iscrowd': 1, 'area': 0,
                      'bbox': [0, 0, 1, 1], 'segmentation': rle(rect(0, 0, 10, 10, (h0, w0)))})
  h1, w1 = shapes[1].image.shape[:2]
  annotations.append({'id': 98, 'image_id': 1, 'category_id': 1, 'iscrowd': 0, 'area': 1,
                      'bbox': [0, 0, 1, 1], 'segmentation': {'size': [h0, w0], 'counts': '!!'}})
  # Image 4: a file, but its only annotation is not a valid mask.
  (root / 'images' / '3.png').write_bytes(png_bytes(shapes[1].image))
  images.append({'id': 4, 'file_name': '3.png', 'height': h1, 'width': w1})
  annotations.append({'id': 400, 'image_id': 4, 'category_id': 1, 'iscrowd': 0, 'area': 1,
                      'bbox': [0, 0, 1, 1],  # a valid RLE, one row taller than the image
                      'segmentation': rle(np.pad(shapes[1].masks[0], ((0, 1), (0, 0))))})
  (root / 'instances.json').write_text(json.dumps(
      {'images': images, 'annotations': annotations,
       'categories': [{'id': 1, 'name': 'a'}, {'id': 2, 'name': 'b'}]}))
  data_dir = str(root / 'data')
  build.build('coco', data_dir, name='bad', annotations=[f'validation={root / "instances.json"}'],
              images=[str(root / 'images')])
  source = sources.open_source('coco_format/bad', data_dir, 'validation')
  boxes = []
  for image_id, n in ((1, 6), (2, 3), (3, 2), (4, 1), (77, 4)):  # 77: no such image
    boxes += [{'image_id': image_id, 'category_id': k % 2 + 1, 'bbox': [2.0 + k, 3.0, 30.0, 20.0],
               'score': 0.9 - 0.1 * k} for k in range(n)]
  boxes.append({'image_id': 1, 'category_id': 1, 'bbox': [0, 0, -5, 3], 'score': 1.0})
  boxes.append({'image_id': 2, 'category_id': 1, 'bbox': [0, 0, float('nan'), 3], 'score': 0.5})
  path = root / 'boxes.json'
  path.write_text(json.dumps(boxes))
  return source, str(path)


class FlakySource:
  """A source whose record ``bad`` raises on reading."""

  def __init__(self, source, bad: int):
    self.source, self.bad = source, bad

  def __len__(self):
    return len(self.source) + 1

  def __getitem__(self, i):
    if i == self.bad:
      raise OSError('storage hiccup')
    return self.source[i if i < self.bad else i - 1]


def test_instances_count_and_skip_bad_data(models, coco_dataset):
  source, boxes = coco_dataset
  assert len(source) == 4
  flaky = FlakySource(source, bad=1)  # records: 1, unreadable, 2, 3 (corrupt), 4 (no valid mask)
  protocol = instances.Protocol(boxes=boxes, score_thresh=0.45, max_detections=4, batch_size=4)
  res = instances.evaluate_source(models[1], flaky, protocol, name='bad', progress=False)
  assert res['records_read'] == 5 and res['images'] == 2
  assert res['skipped'] == {**dict.fromkeys(coco_eval.COUNTERS, 0), 'images_ok': 2,
                            'records_unreadable': 1, 'images_corrupt': 1,
                            'images_no_usable_mask': 1, 'masks_invalid_rle': 1,
                            'masks_size_mismatch': 1}
  # Image 1: 6 boxes, scores .9 .. .4: one under .45, then the best 4 of 5; image 2: 3 boxes.
  assert res['detections'] == {
      'detections_read': 18, 'detections_invalid_box': 2, 'detections_used': 4 + 3,
      'detections_below_score': 1, 'detections_over_max': 1,
      'detections_on_skipped_images': 2 + 1, 'detections_unknown_image': 4}
  assert res['results'] == 7 and res['gt_crowd'] == 1
  assert 0 <= res['metrics']['AP'] <= 1
  table = instances.markdown({'coco_format/bad:validation': res, 'lvis': {'error': 'not built\nx'}})
  assert '| coco_format/bad:validation | 2 | 7 |' in table and 'error: not built' in table
  assert 'images_corrupt 1' in table and 'detections_unknown_image 4' in table
  assert '| AP | AP50 | AP75 | AP_S | AP_M | AP_L |' in table


def test_work_split_over_hosts_gives_the_same_figures(models, coco_dataset):
  source, boxes = coco_dataset
  protocol = instances.Protocol(boxes=boxes, batch_size=4)
  predictor = SamPredictor(models[1])
  whole = instances.run_images(predictor, source, range(4), protocol, progress=False)
  parts = [instances.run_images(predictor, source, idx, protocol, progress=False)
           for idx in ([3, 1], [0, 2])]  # any order, any split
  parts = json.loads(json.dumps(parts))  # entries travel between hosts as JSON
  a = instances.summarize(source, whole, protocol)
  b = instances.summarize(source, parts[0] + parts[1], protocol)
  assert a == b and a['results'] == 9


@pytest.mark.parametrize('content, message', [
    ({'images': [], 'annotations': []}, 'looks like a COCO annotation file'),
    ([{'image_id': 1, 'bbox': [0, 0, 1, 1], 'score': 1}], r"detection 0 has no \['category_id'\]"),
    ([{'image_id': 1, 'category_id': 1, 'bbox': [0, 0, 1], 'score': 1}], 'bbox of 3 numbers'),
    ([{'image_id': 1, 'category_id': 1, 'bbox': 'x', 'score': 1}], 'not numbers'),
    ([[1, 2, 3, 4]], 'detection 0 is a list'),
])
def test_boxes_file_that_is_not_detections_is_an_error(tmp_path, content, message):
  path = tmp_path / 'boxes.json'
  path.write_text(json.dumps(content))
  with pytest.raises(ValueError, match=message):
    instances.load_detections(str(path))


def test_boxes_file_missing_or_not_json(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    instances.load_detections(str(tmp_path / 'nope.json'))
  (tmp_path / 'bad.json').write_text('[{"image_id": 1,')
  with pytest.raises(ValueError, match='is not JSON'):
    instances.load_detections(str(tmp_path / 'bad.json'))
  with pytest.raises(ValueError, match='no boxes file'):
    instances.load_detections('')
