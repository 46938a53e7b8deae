"""Every dataset builds from small folders made here and reads back exactly (ArrayRecord, random
access): synthetic shapes, SA-1B folders and tars, COCO / LVIS json, the catalogue's
segment_anything."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from pycocotools import mask as mask_utils

from sam_jax.data import build, fake_data, sources, synthetic_shapes
from sam_jax.data.config import InputConfig
from sam_jax.data.pipeline import InputPipeline


def decode(counts, size) -> np.ndarray:
  return mask_utils.decode({'counts': counts, 'size': [int(v) for v in size]}).astype(bool)


def record_masks(rec) -> list[np.ndarray]:
  return [decode(c, s) for c, s in zip(rec['masks']['counts'], rec['masks']['size'])]


def test_synthetic_shapes_are_deterministic_overlapping_and_varied():
  spec = synthetic_shapes.ShapesSpec(image_size=96)
  a, b = synthetic_shapes.render(5, 3, spec), synthetic_shapes.render(5, 3, spec)
  np.testing.assert_array_equal(a.image, b.image)
  np.testing.assert_array_equal(a.masks, b.masks)
  assert not np.array_equal(a.image, synthetic_shapes.render(6, 3, spec).image)
  kinds, overlapped = set(), 0
  for i in range(30):
    s = synthetic_shapes.render(0, i, spec)
    assert max(s.image.shape[:2]) == 96 and min(s.image.shape[:2]) >= 0.6 * 96 - 1
    assert (s.masks.sum(axis=0) <= 1).all()  # visible parts never overlap
    assert (s.masks.sum(axis=(1, 2)) >= spec.min_visible_px).all()
    kinds.update(s.kinds)
    overlapped += int(len(s.masks) >= 2)
  assert kinds == set(synthetic_shapes.KINDS) and overlapped >= 25


def test_synthetic_shapes_build_reads_back_exactly(tmp_path):
  fv = build.flags.FlagValues()  # the command line, flags included, on its own flag set
  build.define_flags(fv)
  argv = fv(['build', 'synthetic_shapes', '--data_dir', str(tmp_path), '--config', 'tiny',
             '--image_size', '48', '--num_train', '5', '--num_validation', '2', '--seed', '3'])
  build.main(argv, fv)
  train = sources.open_source('synthetic_shapes/tiny', str(tmp_path), 'train')
  assert len(train) == 5 and len(sources.open_source('synthetic_shapes/tiny', str(tmp_path),
                                                     'validation')) == 2
  for rec in (train[i] for i in range(5)):
    expected = synthetic_shapes.render(3, rec['image_id'], synthetic_shapes.ShapesSpec(48))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(rec['image']))), expected.image)
    np.testing.assert_array_equal(np.stack(record_masks(rec)), expected.masks)
    assert [synthetic_shapes.KINDS[c - 1] for c in rec['masks']['category_id']] == list(
        expected.kinds)


def sa1b_items(seed, count, prefix):
  items, masks = [], {}
  rng = np.random.default_rng(seed)
  for i in range(count):
    jpg, rles, m = fake_data.small_sa1b_sample(seed, i, image_size=56)
    image_id = seed * 100 + i
    h, w = m.shape[1:]
    items.append((f'{prefix}_{image_id}', jpg,
                  fake_data.sa1b_annotation(image_id, f'{prefix}_{image_id}.jpg', h, w, rles, rng)))
    masks[image_id] = m
  return items, masks


def test_sa1b_builds_from_folders_and_tars_keeping_every_field(tmp_path):
  manual = tmp_path / 'manual'
  folder_items, masks = sa1b_items(1, 3, 'sa')
  tar_items, tar_masks = sa1b_items(2, 3, 'sa')
  masks.update(tar_masks)
  fake_data.write_sa1b_folder(str(manual / 'extracted'), folder_items)
  fake_data.write_sa1b_tar(str(manual / 'sa_000000.tar'), tar_items)
  (manual / 'extracted' / 'broken.json').write_text('{not json')   # left out, logged
  (manual / 'extracted' / 'broken.jpg').write_bytes(b'')
  (manual / 'extracted' / 'lonely.json').write_text(json.dumps(folder_items[0][2]))  # no .jpg
  build.build('sa1b', str(tmp_path / 'data'), manual_dir=str(manual))

  source = sources.open_source('sa1b', str(tmp_path / 'data'))
  assert len(source) == 6
  annotations = {ann['image']['image_id']: (jpg, ann) for _, jpg, ann in folder_items + tar_items}
  for rec in (source[i] for i in range(len(source))):
    jpg, ann = annotations[rec['image_id']]
    assert rec['image'] == jpg and rec['file_name'] == ann['image']['file_name'].encode()
    assert (rec['height'], rec['width']) == (ann['image']['height'], ann['image']['width'])
    for got, want in zip(record_masks(rec), masks[rec['image_id']]):
      np.testing.assert_array_equal(got, want)
    m = rec['masks']
    assert [c.decode() for c in m['counts']] == [a['segmentation']['counts']
                                                  for a in ann['annotations']]
    for key in ('predicted_iou', 'stability_score', 'bbox', 'crop_box', 'area', 'id'):
      np.testing.assert_allclose(np.asarray(m[key], np.float64),
                                 [a[key] for a in ann['annotations']], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m['point_coords']),
                               [a['point_coords'][0] for a in ann['annotations']], rtol=1e-6)


def test_coco_and_lvis_formats(tmp_path):
  images = tmp_path / 'coco'
  (images / 'val2017').mkdir(parents=True)
  samples = [fake_data.small_sa1b_sample(9, i, image_size=60) for i in range(3)]
  (images / 'a.jpg').write_bytes(samples[0][0])
  (images / 'val2017' / 'b.jpg').write_bytes(samples[1][0])  # LVIS: found through coco_url
  (images / 'c.jpg').write_bytes(samples[2][0])
  (h0, w0), (h1, w1) = samples[0][2].shape[1:], samples[1][2].shape[1:]
  square = [5, 5, 25, 5, 25, 20, 5, 20]
  uncompressed = {'size': [h0, w0], 'counts': [h0 * 3, h0 * 2, h0 * (w0 - 5)]}  # 2 columns
  annotations = {
      'images': [
          {'id': 1, 'file_name': 'a.jpg', 'height': h0, 'width': w0},
          {'id': 2, 'coco_url': 'http://images.cocodataset.org/val2017/b.jpg', 'height': h1,
           'width': w1},
          {'id': 3, 'file_name': 'c.jpg', 'height': 10, 'width': 10},  # no annotation: left out
          {'id': 4, 'file_name': 'missing.jpg', 'height': 10, 'width': 10},  # no file: left out
      ],
      'annotations': [
          {'id': 10, 'image_id': 1, 'category_id': 7, 'iscrowd': 0, 'bbox': [5, 5, 20, 15],
           'area': 300, 'segmentation': [square, [30, 30, 40, 30, 35, 40]]},  # two polygons
          {'id': 11, 'image_id': 1, 'category_id': 8, 'iscrowd': 1, 'bbox': [3, 0, 2, h0],
           'area': 2 * h0, 'segmentation': uncompressed},
          {'id': 12, 'image_id': 1, 'category_id': 7, 'iscrowd': 0, 'bbox': [0, 0, 1, 1],
           'area': 4, 'segmentation': [[1, 1, 3, 1]]},  # 2 points: unreadable, left out
          {'id': 20, 'image_id': 2, 'category_id': 3, 'bbox': [0, 0, 1, 1], 'area': 1,
           'segmentation': fake_data.encode(samples[1][2][0])},  # compressed RLE (LVIS: no iscrowd)
          {'id': 21, 'image_id': 4, 'category_id': 3, 'bbox': [0, 0, 1, 1], 'area': 1,
           'segmentation': [square]},
      ],
  }
  path = tmp_path / 'instances.json'
  path.write_text(json.dumps(annotations))
  build.build('coco', str(tmp_path / 'data'), name='mini', annotations=[f'validation={path}'],
              images=[str(images)])
  with pytest.raises(ValueError, match="has no split 'train'"):
    sources.open_source('coco_format/mini', str(tmp_path / 'data'))
  source = sources.open_source('coco_format/mini', str(tmp_path / 'data'), 'validation')
  recs = {r['image_id']: r for r in (source[i] for i in range(len(source)))}
  assert sorted(recs) == [1, 2]
  a, b = recs[1], recs[2]
  assert a['image'] == samples[0][0] and b['image'] == samples[1][0]
  polygons = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(
      [square, [30, 30, 40, 30, 35, 40]], h0, w0))).astype(bool)
  column_mask = np.zeros((h0, w0), bool)
  column_mask[:, 3:5] = True
  got = record_masks(a)
  np.testing.assert_array_equal(got[0], polygons)
  np.testing.assert_array_equal(got[1], column_mask)
  assert list(a['masks']['is_crowd']) == [False, True]
  assert list(a['masks']['category_id']) == [7, 8] and list(a['masks']['id']) == [10, 11]
  np.testing.assert_array_equal(record_masks(b)[0], samples[1][2][0])
  # The pipeline leaves the crowd region out of the targets, and counts it.
  pipe = InputPipeline(InputConfig(dataset='coco_format/mini', data_dir=str(tmp_path / 'data'),
                                   split='validation', image_size=64, max_masks=4, batch_size=2,
                                   num_epochs=1, shuffle=False), process_index=0, process_count=1)
  batch = next(pipe)
  assert batch['mask_valid'].sum() == 2 and pipe.metrics()['masks_crowd'] == 1


def test_segment_anything_catalogue_dataset(tmp_path):
  """A fake of the catalogue's ``segment_anything`` (its own features), read through the adapter."""
  from tensorflow_datasets.datasets.segment_anything import segment_anything_dataset_builder as sa

  items, masks = sa1b_items(4, 3, 'sa')
  with tfds.core.registered.skip_registration():

    class FakeSegmentAnything(sa.Builder):
      name = 'segment_anything'
      pkg_dir_path = epath.Path(sa.__file__).parent  # its README / citation

      def _split_generators(self, dl_manager):
        return {'train': self._generate_examples(items)}

      def _generate_examples(self, items):  # the catalogue's own conversion, without Beam
        for stem, jpg, ann in items:
          ann = json.loads(json.dumps(ann))
          image = dict(ann['image'], content=jpg)
          h, w = image['height'], image['width']
          yield stem, {'image': image, 'annotations': sa._parse_annotations(ann['annotations'], h, w)}

    FakeSegmentAnything(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()

  source = sources.open_source('segment_anything', str(tmp_path))
  by_id = {ann['image']['image_id']: (jpg, ann) for _, jpg, ann in items}
  for rec in (source[i] for i in range(len(source))):
    jpg, ann = by_id[rec['image_id']]
    assert rec['image'] == jpg
    for got, want in zip(record_masks(rec), masks[rec['image_id']]):
      np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(rec['masks']['bbox'], [a['bbox'] for a in ann['annotations']],
                               atol=1e-3)
    np.testing.assert_allclose(rec['masks']['point_coords'],
                               [a['point_coords'][0] for a in ann['annotations']], rtol=1e-6)
  pipe = InputPipeline(InputConfig(dataset='segment_anything', data_dir=str(tmp_path),
                                   image_size=64, max_masks=4, batch_size=3, num_epochs=1),
                       process_index=0, process_count=1)
  assert sorted(next(pipe)['image_id']) == sorted(by_id)
  assert pipe.metrics()['images_ok'] == 3


def test_not_built_datasets_name_their_build_command(tmp_path):
  d = str(tmp_path)
  with pytest.raises(sources.DatasetNotBuiltError,
                     match=f'python -m sam_jax.data.build sa1b --data_dir {d} --manual_dir'):
    sources.open_source('sa1b', d)
  with pytest.raises(sources.DatasetNotBuiltError,
                     match='synthetic_shapes --data_dir .* --config mine'):
    InputPipeline(InputConfig(dataset='synthetic_shapes/mine', data_dir=d), process_index=0,
                  process_count=1)
  with pytest.raises(sources.DatasetNotBuiltError, match='build coco .* --name lvis'):
    sources.open_source('coco_format/lvis', d)
  with pytest.raises(sources.DatasetNotBuiltError, match='tfds build segment_anything'):
    sources.open_source('segment_anything', d)
  with pytest.raises(ValueError, match='Unknown dataset'):
    sources.open_source('imagenet', d)
  assert os.listdir(d) == []
