"""The single point valid mask protocol (``sam_jax.evaluation.single_point``) and ``eval.py``.

Parity: the protocol written out in plain numpy + torch around the official
``segment_anything.SamPredictor`` (one mask, one ``predict`` call per click, distance transforms on
the whole image) against ours (all masks of an image batched through the decoder, distance
transforms on the error region's box), on the same random vit_tiny weights: the same clicks and the
same mIoU at every click count.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
from unittest import mock

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from conftest import PARITY_REPORT
from official_reference import official_sam, ref_farthest, ref_protocol, save_pth
from sam_jax import SamPredictor, sam_model_registry
from sam_jax.data import fake_data, synthetic_shapes
from sam_jax.evaluation import single_point
from sam_jax.modeling.config import VARIANTS

torch = pytest.importorskip('torch')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_POINTS = 9


# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def models(tmp_path_factory):
  """The official vit_tiny with random weights, and ours loaded from its .pth."""
  ref = official_sam(VARIANTS['vit_tiny'], seed=1)
  path = save_pth(ref, tmp_path_factory.mktemp('eval_pth') / 'vit_tiny.pth')
  return ref, sam_model_registry['vit_tiny'](checkpoint=path)


def shapes_records(n: int, image_size: int = 96, seed: int = 5):
  """Synthetic-shapes records (the builder's own ``to_record``), non-square images."""
  return [synthetic_shapes.to_record(synthetic_shapes.render(
      seed, i, synthetic_shapes.ShapesSpec(image_size=image_size)), image_id=100 + i)
          for i in range(n)]


def test_protocol_matches_the_official_predictor(models):
  from segment_anything import SamPredictor as OfficialPredictor
  ref_model, ours = models
  records = shapes_records(3)
  # batch_size 4 < masks per image: an image's masks go through the decoder in several batches.
  protocol = single_point.Protocol(num_points=NUM_POINTS, first_points=('center',), batch_size=4)
  result = single_point.evaluate_source(SamPredictor(ours), records, protocol, progress=False)
  got = result['variants']['center']
  assert result['skipped']['images_ok'] == 3 and result['masks'] == len(got['masks']) >= 10

  official = OfficialPredictor(ref_model)
  want = []
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # 2 threads on 2 busy cores: ~70x slower here (spinning workers)
  try:
    for rec in records:
      image = np.asarray(Image.open(io.BytesIO(rec['image'])).convert('RGB'))
      gts = [mask_utils.decode({'size': m['size'].tolist(), 'counts': m['counts'].encode()})
             .astype(bool) for m in rec['masks']]
      want += ref_protocol(official, image, gts, NUM_POINTS)
  finally:
    torch.set_num_threads(threads)

  assert len(want) == len(got['masks'])
  assert {c[2] for w in want for c in w[0][1:]} == {0, 1}  # corrections of both kinds were made
  for m, (clicks, ious, oracle) in zip(got['masks'], want):
    assert m['clicks'] == clicks, (m['record'], m['mask'])
    assert m['first_point'] == clicks[0][:2]
  got_ious = np.array([m['iou'] for m in got['masks']])
  want_ious = np.array([w[1] for w in want])
  miou_diff = np.abs(got_ious.mean(0) - want_ious.mean(0))
  oracle_diff = abs(got['oracle_miou_1'] - np.mean([w[2] for w in want]))
  np.testing.assert_allclose([got['miou'][str(p)] for p in range(1, NUM_POINTS + 1)],
                             want_ious.mean(0), atol=1e-3)
  assert oracle_diff <= 1e-3
  n_clicks = sum(len(w[0]) for w in want)
  PARITY_REPORT.append(
      f'single-point protocol vs official, vit_tiny, {len(want)} masks, {n_clicks} clicks: '
      f'clicks identical, max |dmIoU| {miou_diff.max():.1e} over 1..{NUM_POINTS} clicks, '
      f'|d oracle| {oracle_diff:.1e}, max per-mask |dIoU| {np.abs(got_ious - want_ious).max():.1e}')


def test_next_click_matches_the_whole_image_distance_transform():
  rng = np.random.default_rng(0)
  for _ in range(30):
    gt = ndimage.binary_dilation(rng.random((40, 57)) < 0.02, iterations=int(rng.integers(1, 6)))
    pred = ndimage.binary_dilation(rng.random((40, 57)) < 0.02, iterations=int(rng.integers(1, 6)))
    fn_d, fn_xy = ref_farthest(gt & ~pred)
    fp_d, fp_xy = ref_farthest(pred & ~gt)
    want = (*fn_xy, 1) if fn_d > fp_d else (*fp_xy, 0)
    assert single_point.next_click(gt, pred) == tuple(int(v) for v in want)
  assert single_point.next_click(gt, gt.copy()) is None


def test_subsample_is_seeded_and_sized():
  index = [(i, np.arange(5) * 2) for i in range(6)]  # 30 masks
  p = single_point.Protocol(max_masks=25, subsample_to=12, seed=3)
  a, sub = single_point.subsample(index, p)
  b, _ = single_point.subsample(index, p)
  assert sub and sum(len(m) for _, m in a) == 12
  assert [(i, m.tolist()) for i, m in a] == [(i, m.tolist()) for i, m in b]
  assert all(set(m.tolist()) <= set(range(0, 10, 2)) for _, m in a)
  c, sub = single_point.subsample(index, single_point.Protocol(max_masks=30))
  assert not sub and c is index


# ------------------------------------------------------------------------------------------------
# eval.py end to end: a synthetic split, an SA-1B-format set of bad records, a dataset not built.

@pytest.fixture(scope='module')
def eval_run(models, tmp_path_factory):
  from flax import nnx

  from sam_jax.checkpoints import orbax_io
  from sam_jax.data import build
  root = tmp_path_factory.mktemp('eval_run')
  data_dir = str(root / 'data')
  build.build('synthetic_shapes', data_dir, config='evaltest', image_size=80, num_train=1,
              num_validation=3, seed=2)
  rng = np.random.default_rng(0)
  items = []

  def add(stem, jpg, rles, hw):
    items.append((stem, jpg, fake_data.sa1b_annotation(len(items), stem + '.jpg', *hw, rles, rng)))

  jpg, rles, masks = fake_data.small_sa1b_sample(7, 0, image_size=64)
  hw = masks.shape[1:]
  add('good', jpg, rles[:4], hw)
  add('truncated_jpeg', jpg[:len(jpg) // 3], rles, hw)     # header reads, pixels do not
  add('not_an_image', b'\x00' * 100, rles, hw)             # header does not read
  add('no_annotations', jpg, [], hw)                       # an image without masks
  add('only_invalid_rle', jpg, [dict(rles[0], counts='!!')], hw)
  fake_data.write_sa1b_folder(str(root / 'manual'), items)
  build.build('sa1b', data_dir, manual_dir=str(root / 'manual'))

  ours = models[1]
  checkpoint = orbax_io.save(root / 'ckpt', ours.config, nnx.state(ours))  # records the model
  spec = importlib.util.spec_from_file_location('sam_jax_eval_cli', os.path.join(REPO, 'eval.py'))
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  workdir = str(root / 'out')
  argv = [
      'eval.py', f'--config={os.path.join(REPO, "configs/eval/synthetic.py")}',
      f'--config.checkpoint={checkpoint}', f'--config.data_dir={data_dir}',
      '--config.datasets=synthetic_shapes/evaltest:validation,sa1b:train,'
      'coco_format/not_built:validation',
      # The shapes the parity test compiled (4 masks a batch, 9 clicks, images under 128 px).
      '--config.single_point.batch_size=4', f'--workdir={workdir}']
  with mock.patch.object(sys, 'argv', argv):  # config_flags reads its overrides from sys.argv
    cli.FLAGS(argv)
    cli.main(argv)
  return workdir, data_dir


def test_eval_writes_every_figure_table_plot_and_log(eval_run):
  from sam_jax.data import prompts, sources
  workdir, data_dir = eval_run
  results = json.load(open(os.path.join(workdir, 'results.json')))
  assert results['model']['variant'] == 'vit_tiny'  # read from the orbax checkpoint
  assert results['protocols']['single_point']['first_points'] == ['center', 'random']
  shapes = results['single_point']['synthetic_shapes/evaltest:validation']
  source = sources.open_source('synthetic_shapes/evaltest', data_dir, 'validation')
  assert shapes['images'] == 3 and shapes['masks'] == shapes['usable_masks'] == sum(
      len(source[i]['masks']['counts']) for i in range(3))
  for variant in ('center', 'random'):
    r = shapes['variants'][variant]
    assert sorted(r['miou'], key=int) == [str(p) for p in range(1, 10)]
    assert 0 <= r['miou']['1'] <= 1
    assert r['miou']['1'] <= r['oracle_miou_1'] and len(r['masks']) == shapes['masks']
    per_mask = np.array([m['iou'] for m in r['masks']])
    np.testing.assert_allclose(per_mask.mean(0), [r['miou'][str(p)] for p in range(1, 10)],
                               atol=1e-5)
    # By COCO's area ranges: every mask in exactly one, the figures those masks' means.
    area = np.array([m['area'] for m in r['masks']])
    assert area.tolist() == [int(source[m['record']]['masks']['area'][m['mask']])
                             for m in r['masks']]
    assert sum(a['masks'] for a in r['by_area'].values()) == len(r['masks'])
    for name, lo, hi in single_point.AREA_RANGES:
      sel = (area >= lo) & (area < hi)
      got = [r['by_area'][name]['miou'][str(p)] for p in range(1, 10)]
      assert r['by_area'][name]['masks'] == sel.sum()
      if sel.any():
        np.testing.assert_allclose(got, per_mask[sel].mean(0), atol=1e-5)
      else:
        assert got == [None] * 9
  # The first points written are the masks' centres (the random ones lie inside their masks).
  for m in shapes['variants']['center']['masks']:
    rec = source[m['record']]
    hw = (rec['height'], rec['width'])
    centre = prompts.center_points([rec['masks']['counts'][m['mask']]], hw)[0]
    assert m['first_point'] == centre.astype(int).tolist()
  for m in shapes['variants']['random']['masks']:
    rec = source[m['record']]
    gt = mask_utils.decode({'size': [rec['height'], rec['width']],
                            'counts': rec['masks']['counts'][m['mask']]})
    assert gt[m['first_point'][1], m['first_point'][0]]
  assert [r[1:] for r in single_point.AREA_RANGES] == [(0, 32**2), (32**2, 96**2),
                                                       (96**2, float('inf'))]  # COCOeval's
  table = open(os.path.join(workdir, 'results.md')).read()
  assert '| synthetic_shapes/evaltest:validation |' in table
  assert '| synthetic_shapes/evaltest:validation | small |' in table
  assert '| 1 pt | 2 pt | 3 pt | 5 pt | 9 pt | oracle @1 |' in table
  with Image.open(os.path.join(workdir, 'miou_vs_points.png')) as im:
    assert im.size[0] > 300 and im.size[1] > 200
  log = open(os.path.join(workdir, 'logs', 'synthetic_shapes_evaltest_validation.log')).read()
  assert 'mIoU' in log
  # The other protocols of configs/eval/synthetic.py: box prompts from the masks' own boxes, and
  # proposals, scored by COCOeval on the same images.
  inst = results['instances']['synthetic_shapes/evaltest:validation']
  assert inst['images'] == 3 and inst['results'] == inst['gt_masks'] == shapes['masks']
  assert inst['protocol']['boxes'] == 'ground_truth' and 0 <= inst['metrics']['AP'] <= 1
  prop = results['proposals']['synthetic_shapes/evaltest:validation']
  assert prop['images'] == 3 and prop['protocol']['points_per_side'] == 16
  assert 0 < prop['proposals_per_image'] <= 3 * 16 * 16 and 0 <= prop['metrics']['AR@1000'] <= 1
  assert '# Instance segmentation from detector boxes' in table and '# Object proposals' in table
  assert 'AP' in log and 'AR@1000' in log


def test_bad_records_and_datasets_are_reported_and_skipped(eval_run):
  workdir, _ = eval_run
  results = json.load(open(os.path.join(workdir, 'results.json')))
  bad = results['single_point']['sa1b:train']
  assert bad['records_read'] == 5 and bad['images'] == 1 and bad['masks'] == 4
  assert bad['skipped'] == {**dict.fromkeys(single_point.COUNTERS, 0), 'images_ok': 1,
                            'images_corrupt': 2, 'images_no_usable_mask': 2,
                            'masks_invalid_rle': 1}
  for protocol in ('single_point', 'instances', 'proposals'):
    assert 'not built' in results[protocol]['coco_format/not_built:validation']['error']
  for protocol in ('instances', 'proposals'):
    skipped = results[protocol]['sa1b:train']['skipped']
    assert results[protocol]['sa1b:train']['images'] == 1, protocol
    assert (skipped['images_corrupt'], skipped['images_no_usable_mask']) == (2, 2), protocol
  table = open(os.path.join(workdir, 'results.md')).read()
  assert 'images_corrupt 2' in table and 'images_no_usable_mask 2' in table and 'error:' in table
  log = open(os.path.join(workdir, 'logs', 'sa1b_train.log')).read()
  assert 'skipping record' in log and 'images_corrupt' in log
