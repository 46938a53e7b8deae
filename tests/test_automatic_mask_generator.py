"""SamAutomaticMaskGenerator: parity with the official generator on the same weights, its mask
utilities against the official ones, input checks, and compile caching.

The official vit_tiny model (every tensor random) is edited by ``amg_reference.coherent_masks`` so
that its masks are image regions (fully random decoders give whole-image texture that NMS collapses
to one mask), saved as .pth and loaded by ours. Thresholds are lowered so that a good number of
masks survive; the photographs are non-square.

Ties in NMS scores are common in the official pipeline (between crops every mask of a crop scores
1 / crop area; after small-region cleanup the scores are 0 or 1), and torchvision breaks them with
an unstable sort (torch's introsort: arbitrary for more than 16 boxes), so which of two tied
overlapping masks survives is unspecified there. Ours breaks ties by record order; the official
generator is compared with the same tie rule (``stable_batched_nms``), which makes its whole output,
order included, well defined.
"""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from amg_reference import coherent_masks, stable_batched_nms
from conftest import PARITY_REPORT
from official_reference import official_sam, save_pth
from sam_jax import sam_model_registry
from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
from sam_jax.modeling.config import VARIANTS
from sam_jax.utils import amg

torch = pytest.importorskip('torch')
pytest.importorskip('cv2')

FEW_POINTS = dict(points_per_side=16, pred_iou_thresh=0.48, stability_score_thresh=0.3)


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
  """(official Sam, our Sam) with the same coherent-mask random weights."""
  ref = coherent_masks(official_sam(VARIANTS['vit_tiny'], seed=1))
  path = save_pth(ref, tmp_path_factory.mktemp('amg') / 'vit_tiny.pth')
  return ref, sam_model_registry['vit_tiny'](checkpoint=path)


def as_mask(segmentation) -> np.ndarray:
  """(H, W) bool from any output mode."""
  from pycocotools import mask as mask_utils
  if isinstance(segmentation, np.ndarray):
    return segmentation
  if isinstance(segmentation['counts'], list):
    return amg.rle_to_mask(segmentation)
  return mask_utils.decode(segmentation).astype(bool)


def match(ours: list[dict], theirs: list[dict]) -> dict:
  """Matches each of our masks to the official mask of highest IoU; the worst differences."""
  a = np.stack([as_mask(r['segmentation']).reshape(-1) for r in ours]).astype(np.float32)
  b = np.stack([as_mask(r['segmentation']).reshape(-1) for r in theirs]).astype(np.float32)
  inter = a @ b.T
  iou = inter / (a.sum(1)[:, None] + b.sum(1)[None] - inter)
  best = iou.argmax(1)
  pairs = [(ours[i], theirs[j]) for i, j in enumerate(best)]
  return dict(
      one_to_one=len(set(best.tolist())) == len(ours),
      same_order=bool((best == np.arange(len(ours))).all()), worst_iou=float(iou.max(1).min()),
      score=max(abs(x['predicted_iou'] - y['predicted_iou']) for x, y in pairs),
      stability=max(abs(x['stability_score'] - y['stability_score']) for x, y in pairs),
      bbox=max(float(np.abs(np.subtract(x['bbox'], y['bbox'])).max()) for x, y in pairs),
      area=max(abs(x['area'] - y['area']) for x, y in pairs),
      same_crop=all(x['crop_box'] == y['crop_box'] for x, y in pairs),
      same_point=all(np.allclose(x['point_coords'], y['point_coords']) for x, y in pairs))


@pytest.mark.parametrize('photo, settings', [
    ('coffee', dict(output_mode='binary_mask')),
    ('coffee', dict(crop_n_layers=1, points_per_batch=100, output_mode='uncompressed_rle')),
    ('chelsea', dict(crop_n_layers=1, min_mask_region_area=1000, output_mode='coco_rle')),
], ids=['coffee', 'coffee-crops-rle', 'chelsea-crops-small-regions-coco'])
def test_parity_with_official(pair, photo, settings, monkeypatch):
  import segment_anything.automatic_mask_generator as official
  monkeypatch.setattr(official, 'batched_nms', stable_batched_nms)
  ref, ours = pair
  image = getattr(skimage.data, photo)()
  kwargs = dict(FEW_POINTS, **settings)
  with torch.no_grad():
    theirs = official.SamAutomaticMaskGenerator(ref, **kwargs).generate(image)
  mine = SamAutomaticMaskGenerator(ours, **kwargs).generate(image)
  assert len(theirs) >= 10, 'too few masks survive for the comparison to mean much'
  assert len(mine) == len(theirs)
  assert sorted(mine[0]) == sorted(theirs[0])
  for r in mine:  # (the official's boxes turn float when a batch or crop keeps no mask)
    assert isinstance(r['area'], int) and all(isinstance(v, int) for v in r['bbox'] + r['crop_box'])
    assert isinstance(r['predicted_iou'], float) and isinstance(r['stability_score'], float)
  if settings['output_mode'] == 'binary_mask':
    assert all(r['segmentation'].shape == image.shape[:2] for r in mine)
  else:
    assert all(type(r['segmentation']['counts']) is type(t['segmentation']['counts'])
               for r, t in zip(mine, theirs))
  m = match(mine, theirs)
  PARITY_REPORT.append(
      f'AMG {photo} {settings}: {len(mine)} masks (official {len(theirs)}), worst mask IoU '
      f'{m["worst_iou"]:.4f}, |d predicted_iou| {m["score"]:.1e}, |d stability| '
      f'{m["stability"]:.1e}, bbox {m["bbox"]:.0f} px, area {m["area"]} px')
  assert m['one_to_one'] and m['same_order'] and m['worst_iou'] >= 0.99
  assert m['score'] <= 1e-3 and m['stability'] <= 1e-3 and m['bbox'] <= 1
  assert m['same_crop'] and m['same_point']


# --- utilities against the official ones ------------------------------------------------------


def random_masks(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
  """(n, H, W) bool blobs with holes and islands (thresholded smooth noise)."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  noise = rng.standard_normal((n, h // 8 + 1, w // 8 + 1)).astype(np.float32)
  smooth = np.stack([np.asarray(Image.fromarray(x).resize((w, h), Image.BILINEAR)) for x in noise])
  return smooth > 0.6


def test_rle_and_boxes_match_official():
  from segment_anything.utils import amg as official
  masks = random_masks(6, 37, 53)
  masks[0] = False  # empty
  masks[1] = True  # full
  theirs = official.mask_to_rle_pytorch(torch.as_tensor(masks))
  ours = [amg.mask_to_rle(np.ascontiguousarray(m.T)) for m in masks]
  assert ours == theirs
  for m, rle in zip(masks, ours):
    assert (amg.rle_to_mask(rle) == m).all() and amg.area_from_rle(rle) == m.sum()
    assert amg.coco_encode_rle(rle) == official.coco_encode_rle(rle)
  boxes = official.batched_mask_to_box(torch.as_tensor(masks)).numpy()
  np.testing.assert_array_equal(np.asarray(amg.mask_to_box(masks)), boxes)
  np.testing.assert_array_equal(np.stack([amg.host_mask_to_box(m) for m in masks]), boxes)


def test_remove_small_regions_matches_official():
  from segment_anything.utils import amg as official
  for mask in random_masks(8, 64, 96, seed=1):
    for mode in ('holes', 'islands'):
      for area in (20, 200, 10_000):
        ours, changed = amg.remove_small_regions(mask, area, mode)
        theirs, their_changed = official.remove_small_regions(mask, area, mode)
        assert changed == their_changed and (ours == theirs).all()


def test_grids_and_crops_match_official():
  from segment_anything.utils import amg as official
  for n, layers, scale in ((32, 0, 1), (16, 2, 2), (7, 1, 1)):
    for a, b in zip(amg.build_all_layer_point_grids(n, layers, scale),
                    official.build_all_layer_point_grids(n, layers, scale)):
      np.testing.assert_array_equal(a, b)
  for size in ((400, 600), (301, 451), (8, 5)):
    for layers in (0, 1, 2):
      assert amg.generate_crop_boxes(size, layers, 512 / 1500) == \
          official.generate_crop_boxes(size, layers, 512 / 1500)


def test_nms_matches_torchvision_semantics():
  from torchvision.ops.boxes import nms as reference_nms
  rng = np.random.default_rng(0)
  xy = rng.integers(0, 80, (300, 2))
  wh = rng.integers(0, 40, (300, 2))  # zero-size boxes included
  boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  scores = rng.permutation(300).astype(np.float32)  # no ties: the order is then unique
  for thresh in (0.3, 0.7):
    theirs = reference_nms(torch.as_tensor(boxes), torch.as_tensor(scores), thresh).numpy()
    np.testing.assert_array_equal(amg.run_nms(boxes, scores, thresh, 512), theirs)
  assert len(amg.run_nms(np.zeros((0, 4)), np.zeros(0), 0.7, 512)) == 0
  with pytest.raises(ValueError, match='do not fit'):
    amg.run_nms(boxes, scores, 0.7, 256)


# --- inputs, edge cases, compile caching --------------------------------------------------------


@pytest.fixture(scope='module')
def generator():
  return SamAutomaticMaskGenerator(sam_model_registry['vit_tiny'](seed=0), points_per_side=8,
                                   pred_iou_thresh=0.0, stability_score_thresh=0.0)


@pytest.mark.parametrize('image, message', [
    (np.zeros((50, 60), np.uint8), 'grayscale'),
    (np.zeros((50, 60, 4), np.uint8), 'RGBA'),
    (np.zeros((50, 60, 3), np.float32), 'uint8'),
])
def test_bad_images(generator, image, message):
  with pytest.raises(ValueError, match=message):
    generator.generate(image)


@pytest.mark.parametrize('kwargs, message', [
    (dict(points_per_side=None), 'Exactly one'),
    (dict(point_grids=[amg.build_point_grid(4)]), 'Exactly one'),
    (dict(output_mode='png'), 'output_mode'),
    (dict(points_per_side=None, point_grids=[amg.build_point_grid(4)], crop_n_layers=1),
     'one per layer'),
    (dict(points_per_batch=0), 'points_per_batch'),
])
def test_bad_settings(kwargs, message):
  with pytest.raises(ValueError, match=message):
    SamAutomaticMaskGenerator(sam_model_registry['vit_tiny'](seed=0), **kwargs)


def test_tiny_image_and_empty_result(generator):
  image = np.random.default_rng(0).integers(0, 256, (8, 5, 3), np.uint8)
  records = generator.generate(image)
  assert records and all(r['segmentation'].shape == (8, 5) for r in records)
  strict = SamAutomaticMaskGenerator(generator.predictor.model, points_per_side=8,
                                     pred_iou_thresh=1e6)
  assert strict.generate(image) == []


def test_explicit_point_grids(generator):
  grid = np.array([[0.25, 0.25], [0.75, 0.5]])
  gen = SamAutomaticMaskGenerator(generator.predictor.model, points_per_side=None,
                                  point_grids=[grid], pred_iou_thresh=0.0,
                                  stability_score_thresh=0.0)
  records = gen.generate(np.zeros((40, 60, 3), np.uint8))
  points = {tuple(r['point_coords'][0]) for r in records}
  assert points and points <= {(15.0, 10.0), (45.0, 20.0)}


def test_no_recompiles_between_batches_or_images(generator):
  rng = np.random.default_rng(1)
  generator.generate(rng.integers(0, 256, (90, 120, 3), np.uint8))  # 64 points: 1 batch
  score, masks = generator.programs.score, generator.programs.masks
  n_score, n_masks = score._cache_size(), masks._cache_size()
  gen = SamAutomaticMaskGenerator(generator.predictor.model, points_per_side=16,
                                  points_per_batch=64, pred_iou_thresh=0.0,
                                  stability_score_thresh=0.0)
  gen.generate(rng.integers(0, 256, (90, 120, 3), np.uint8))  # 256 points: 4 batches
  assert score._cache_size() == n_score and masks._cache_size() == n_masks
  n_nms = amg.nms._cache_size()
  gen.generate(rng.integers(0, 256, (90, 120, 3), np.uint8))  # another image, same size
  assert score._cache_size() == n_score and masks._cache_size() == n_masks
  assert amg.nms._cache_size() == n_nms


def test_decoding_one_prompt_at_a_time_changes_nothing(pair):
  """CPU decodes the prompts of a batch one at a time, accelerators all at once: same records."""
  image = skimage.data.coffee()
  batched = SamAutomaticMaskGenerator(pair[1], **FEW_POINTS)
  one_by_one = SamAutomaticMaskGenerator(pair[1], **FEW_POINTS)
  batched._one_at_a_time, one_by_one._one_at_a_time = False, True
  a, b = batched.generate(image), one_by_one.generate(image)
  assert len(a) == len(b) >= 10
  m = match(a, b)
  assert m['same_order'] and m['worst_iou'] >= 0.999 and m['score'] <= 1e-5
