"""The input pipeline: deterministic, sharded, resumable, right targets and prompts, bad records
skipped and counted."""
from __future__ import annotations

import io
import json

import jax
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sam_jax.data import build, fake_data, preprocess, prompts, sources
from sam_jax.data.config import InputConfig
from sam_jax.data.pipeline import InputPipeline, batch_spec
from sam_jax.utils.transforms import ResizeLongestSide

NUM_IMAGES = 24


@pytest.fixture(scope='module')
def shapes_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('tfds'))
  build.build('synthetic_shapes', d, config='t', image_size=80, num_train=NUM_IMAGES,
              num_validation=2, seed=7)
  return d


def config(data_dir, **kw) -> InputConfig:
  base = dict(dataset='synthetic_shapes/t', data_dir=data_dir, image_size=64, batch_size=4,
              max_masks=6, num_threads=2)
  return InputConfig(**{**base, **kw})


def pipeline(cfg, index=0, count=1) -> InputPipeline:
  return InputPipeline(cfg, process_index=index, process_count=count)


def take(pipe, n):
  return [next(pipe) for _ in range(n)]


def assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batches_match_their_spec_and_become_global_arrays(shapes_dir):
  for normalize in (True, False):
    cfg = config(shapes_dir, normalize=normalize)
    batch = next(pipeline(cfg))
    spec = batch_spec(cfg)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: (s.shape, s.dtype) for k, s in spec.items()}
  assert batch['image'].dtype == np.uint8 and spec['masks'].shape == (4, 6, 16, 16)
  sharding = jax.sharding.NamedSharding(jax.make_mesh((1,), ('data',)), jax.P('data'))
  for k, v in batch.items():
    global_array = jax.make_array_from_process_local_data(sharding, v)
    assert global_array.shape == v.shape and global_array.dtype == v.dtype, k


def test_same_seed_same_batches_other_seed_other_order(shapes_dir):
  a = take(pipeline(config(shapes_dir, num_threads=0)), 3)
  b = take(pipeline(config(shapes_dir, num_threads=3)), 3)  # thread count changes nothing
  for x, y in zip(a, b):
    assert_same(x, y)
  c = take(pipeline(config(shapes_dir, seed=1)), 3)
  assert any((x['image_id'] != z['image_id']).any() for x, z in zip(a, c))
  epoch = np.concatenate([x['image_id'] for x in take(pipeline(config(shapes_dir)), 6)])
  assert sorted(epoch[:NUM_IMAGES]) == list(range(NUM_IMAGES))  # a permutation per epoch
  assert list(epoch[:NUM_IMAGES]) != list(range(NUM_IMAGES))


def test_process_shards_are_disjoint_cover_the_data_and_agree_on_length(shapes_dir):
  cfg = config(shapes_dir, num_epochs=1, batch_size=3)
  shards = []
  for index in range(5):
    batches = list(pipeline(cfg, index, 5))
    assert len(batches) == pipeline(cfg, index, 5).num_batches == 2  # ceil(ceil(24 / 5) / 3)
    ids = np.concatenate([b['image_id'] for b in batches])
    shards.append(set(ids[ids >= 0].tolist()))
  assert sum(len(s) for s in shards) == NUM_IMAGES
  assert set().union(*shards) == set(range(NUM_IMAGES))
  # The element at a stream position is the same whatever the process count.
  one = next(pipeline(config(shapes_dir, batch_size=2), 0, 1))
  two = [next(pipeline(config(shapes_dir, batch_size=1), i, 2)) for i in range(2)]
  for k in one:
    np.testing.assert_array_equal(one[k], np.concatenate([t[k] for t in two]), err_msg=k)


def test_restoring_the_position_gives_exactly_the_next_batch(shapes_dir):
  cfg = config(shapes_dir)
  first = pipeline(cfg)
  take(first, 7)  # past the end of the first epoch (24 images = 6 batches)
  state = json.loads(json.dumps(first.get_state()))
  expected = take(first, 2)
  resumed = pipeline(cfg)
  resumed.set_state(state)
  for want, got in zip(expected, take(resumed, 2)):
    assert_same(want, got)
  assert resumed.metrics() == first.metrics() and resumed.get_state() == first.get_state()
  with pytest.raises(ValueError, match='another pipeline'):
    pipeline(config(shapes_dir, seed=3)).set_state(state)
  with pytest.raises(ValueError, match='another pipeline'):
    pipeline(cfg, 1, 2).set_state(state)


def test_worker_processes_give_the_same_batches(shapes_dir):
  cfg = config(shapes_dir)
  want = take(pipeline(cfg), 2)
  pipe = pipeline(cfg.replace(worker_count=2))
  try:
    for w, g in zip(want, take(pipe, 2)):
      assert_same(w, g)
  finally:
    pipe.close()


def test_finite_stream_pads_the_last_batch(shapes_dir):
  cfg = config(shapes_dir, num_epochs=1, shuffle=False, batch_size=5)
  batches = list(pipeline(cfg))
  assert len(batches) == 5
  ids = np.concatenate([b['image_id'] for b in batches])
  source = sources.open_source(cfg.dataset, shapes_dir)
  assert list(ids) == [source[i]['image_id'] for i in range(NUM_IMAGES)] + [-1]  # stored order
  assert not batches[-1]['mask_valid'][-1].any() and (batches[-1]['image'][-1] == 0).all()


def reference_low_res(mask, original_hw, image_size, low):
  """The mask resized like the image (exact area average), padded, at least half covered."""
  h, w = ResizeLongestSide(image_size).apply_coords(np.array([[original_hw[1], original_hw[0]]]),
                                                    original_hw)[0, ::-1]
  def weights(n, s):
    lo = np.arange(n) * s
    cells = np.arange(low)[:, None]
    return np.clip(np.minimum(lo + s, cells + 1) - np.maximum(lo, cells), 0, None)
  sy, sx = h / original_hw[0] * low / image_size, w / original_hw[1] * low / image_size
  return weights(mask.shape[0], sy) @ mask.astype(float) @ weights(mask.shape[1], sx).T


def matches(target, coverage):
  """Cells at least half covered (ties aside), or the most covered ones of a tiny mask."""
  if coverage.max() < 0.5:
    return np.array_equal(target, coverage >= coverage.max() - 1e-6)
  clear = np.abs(coverage - 0.5) > 1e-4
  return np.array_equal(target[clear], coverage[clear] > 0.5)


def test_targets_and_first_prompts_follow_the_source_masks(shapes_dir):
  cfg = config(shapes_dir, batch_size=6, max_masks=8)
  source = sources.open_source(cfg.dataset, shapes_dir)
  records = {r['image_id']: r for r in (source[i] for i in range(len(source)))}
  cap = cfg.noise_cap
  kinds, checked = [], 0
  for batch in take(pipeline(cfg), 8):  # 2 epochs
    for b, image_id in enumerate(batch['image_id']):
      rec = records[image_id]
      image = np.asarray(Image.open(io.BytesIO(rec['image'])))
      hw = image.shape[:2]
      np.testing.assert_array_equal(batch['original_size'][b], hw)
      to_input = ResizeLongestSide(cfg.image_size)
      h, w = batch['input_size'][b]
      assert max(h, w) == cfg.image_size and (batch['image'][b, h:] == 0).all()
      masks = [mask_utils.decode({'counts': c, 'size': list(s)}).astype(bool)
               for c, s in zip(rec['masks']['counts'], rec['masks']['size'])]
      refs = [reference_low_res(m, hw, cfg.image_size, cfg.low_res_size) for m in masks]
      valid = batch['mask_valid'][b]
      assert valid.sum() == min(len(masks), cfg.max_masks)
      for slot in np.flatnonzero(valid):
        target = batch['masks'][b, slot]
        j = next(j for j, r in enumerate(refs) if matches(target, r))  # the slot's source mask
        ys, xs = np.nonzero(masks[j])
        box = to_input.apply_boxes(np.array([xs.min(), ys.min(), xs.max(), ys.max()]), hw)[0]
        np.testing.assert_allclose(batch['gt_boxes'][b, slot], box, rtol=1e-5)
        coords, labels = batch['prompt_coords'][b, slot], batch['prompt_labels'][b, slot]
        if tuple(labels) == prompts.POINT_LABELS:
          x, y = coords[0] * np.array([hw[1] / w, hw[0] / h])  # back to source pixels
          assert masks[j][int(round(y)), int(round(x))]
          kinds.append('point')
        else:
          assert tuple(labels) == prompts.BOX_LABELS
          assert np.abs(coords.reshape(4) - box).max() <= cap + 1e-4
          assert (coords[0] <= coords[1]).all()
          kinds.append('box' if np.abs(coords.reshape(4) - box).max() > 0 else 'exact box')
        checked += 1
      assert (batch['prompt_labels'][b, ~valid] == -1).all() and not batch['masks'][b, ~valid].any()
  assert checked > 150 and 'exact box' not in kinds
  assert abs(kinds.count('point') / checked - 0.5) < 4 * 0.5 / np.sqrt(checked)


def test_box_noise_is_ten_percent_of_the_side_capped():
  rng = np.random.default_rng(0)
  n = 20000
  small = np.tile([100.0, 100.0, 150.0, 120.0], (n, 1))   # std 5 / 2 px: under the cap
  large = np.tile([100.0, 100.0, 990.0, 1000.0], (n, 1))  # std 89 / 90 px: capped at 20
  for boxes, std in ((small, [5, 2, 5, 2]), (large, None)):
    noise = prompts.noisy_boxes(boxes, rng, (1024, 1024), 0.1, 20.0) - boxes
    assert np.abs(noise).max() <= 20.0 + 1e-4
    if std:
      np.testing.assert_allclose(noise.std(axis=0), std, rtol=0.05)
    else:
      assert (np.abs(noise) > 19.99).mean() > 0.7  # mostly at the cap
  inside = prompts.noisy_boxes(np.tile([0.0, 0.0, 63.0, 40.0], (100, 1)), rng, (41, 64), 0.1, 20.0)
  assert (inside[:, [0, 2]] <= 63).all() and (inside[:, [1, 3]] <= 40).all() and (inside >= 0).all()


@pytest.fixture(scope='module')
def bad_records_dir(tmp_path_factory):
  """SA-1B-format records, one per kind of fault, between good ones."""
  root = tmp_path_factory.mktemp('bad')
  rng = np.random.default_rng(0)
  items = []

  def add(stem, jpg, rles, hw):
    items.append((stem, jpg, fake_data.sa1b_annotation(len(items), stem + '.jpg', *hw, rles, rng)))

  for i in range(3):
    jpg, rles, masks = fake_data.small_sa1b_sample(11, i, image_size=48)
    add(f'good{i}', jpg, rles[:2], masks.shape[1:])
  jpg, rles, masks = fake_data.small_sa1b_sample(11, 9, image_size=48)
  hw = masks.shape[1:]
  add('corrupt_jpeg', jpg[:len(jpg) // 3], rles, hw)  # truncated
  add('not_an_image', b'\x00' * 100, rles, hw)
  add('invalid_rle', jpg, [rles[0], dict(rles[1], counts=rles[1]['counts'] + '5')], hw)
  taller = np.zeros((hw[0] + 1, hw[1]), bool)
  taller[:5, :5] = True
  add('size_mismatch', jpg, [rles[0], fake_data.encode(taller)], hw)
  add('empty_mask', jpg, [rles[0], fake_data.encode(np.zeros(hw, bool))], hw)
  add('only_too_large', jpg, [fake_data.encode(np.ones(hw, bool))], hw)
  add('no_annotation', jpg, [], hw)
  add('only_bad', jpg, [dict(rles[0], counts='!!')], hw)
  fake_data.write_sa1b_folder(str(root / 'manual'), items)
  build.build('sa1b', str(root / 'data'), manual_dir=str(root / 'manual'))
  return str(root / 'data')


def test_every_bad_record_is_skipped_and_counted(bad_records_dir):
  cfg = InputConfig(dataset='sa1b', data_dir=bad_records_dir, image_size=32, batch_size=4,
                    max_masks=4, num_epochs=1, shuffle=False)
  pipe = pipeline(cfg)
  batches = list(pipe)
  ids = np.concatenate([b['image_id'] for b in batches])
  good = {0, 1, 2, 5, 6, 7}  # good0-2, and invalid_rle / size_mismatch / empty_mask keep a mask
  assert set(ids[ids >= 0].tolist()) == good and len(batches) == pipe.num_batches == 3
  m = pipe.metrics()
  assert m == {**dict.fromkeys(preprocess.COUNTERS, 0), 'images_ok': 6, 'images_corrupt': 2,
               'images_no_usable_mask': 3, 'masks_sampled': 9, 'masks_invalid_rle': 2,
               'masks_size_mismatch': 1, 'masks_empty': 1, 'masks_too_large': 1}, m


def test_an_unreadable_record_is_counted_not_raised():
  def read():
    raise KeyError('masks')
  example, counts = preprocess.safe_preprocess(read, np.random.default_rng(0), InputConfig())
  assert example is None and counts['records_unreadable'] == 1


def test_fast_jpeg_decode_is_close_to_the_exact_one():
  rng = np.random.default_rng(0)
  data = fake_data.jpeg_bytes(fake_data.photo_like(rng, 300, 450))
  exact, hw = preprocess.decode_image(data, 128)
  fast, hw_fast = preprocess.decode_image(data, 128, fast_jpeg=True)
  assert hw == hw_fast == (300, 450) and exact.shape == fast.shape == (85, 128, 3)
  assert np.abs(exact.astype(float) - fast).mean() < 3


def test_center_points_are_farthest_from_the_boundary():
  rng = np.random.default_rng(3)
  rect = np.zeros((30, 40), bool)
  rect[5:16, 10:21] = True                   # 11 x 11: the centre is (x, y) = (15, 10)
  ell = np.zeros((30, 40), bool)
  ell[2:28, 2:8] = ell[22:28, 2:38] = True   # an L: the centre lies inside, not at the bbox centre
  edge = np.zeros((30, 40), bool)
  edge[:9, :9] = True                        # at the image corner: the border counts as boundary
  masks = [rect, ell, edge] + [rng.random((30, 40)) < 0.3 for _ in range(3)]
  counts = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))['counts'] for m in masks]
  points = prompts.center_points(counts, (30, 40))
  np.testing.assert_array_equal(points[0], [15, 10])
  np.testing.assert_array_equal(points[2], [4, 4])
  for m, (x, y) in zip(masks, points.astype(int)):
    padded = np.pad(m, 1)
    outside = np.argwhere(~padded) - 1     # (n, 2) y, x, the border ring included
    inside = np.argwhere(m)
    dist = np.sqrt(((inside[:, None] - outside[None]) ** 2).sum(-1)).min(1)  # brute force
    assert m[y, x] and np.sqrt(((outside - [y, x]) ** 2).sum(-1)).min() == dist.max()


def test_center_mode_clicks_the_mask_centres(shapes_dir):
  cfg = config(shapes_dir, point_probability=1.0, point_mode='center', shuffle=False)
  source = sources.open_source(cfg.dataset, shapes_dir)
  records = {r['image_id']: r for r in (source[i] for i in range(len(source)))}
  batch = next(pipeline(cfg))
  for b, image_id in enumerate(batch['image_id']):
    rec = records[image_id]
    hw = tuple(batch['original_size'][b])
    centres = ResizeLongestSide(cfg.image_size).apply_coords(
        prompts.center_points(rec['masks']['counts'], hw), hw)
    for slot in np.flatnonzero(batch['mask_valid'][b]):
      assert tuple(batch['prompt_labels'][b, slot]) == prompts.POINT_LABELS
      assert np.abs(centres - batch['prompt_coords'][b, slot, 0]).sum(1).min() < 1e-4
  with pytest.raises(ValueError, match='point_mode'):
    config(shapes_dir, point_mode='middle')
