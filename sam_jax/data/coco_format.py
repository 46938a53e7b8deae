"""COCO / LVIS instance annotations (a JSON file + an image folder per split), for fine-tuning and
evaluation.

  python -m sam_jax.data.build coco --data_dir ~/tensorflow_datasets --name coco2017 \
      --annotations train=/coco/annotations/instances_train2017.json,\
validation=/coco/annotations/instances_val2017.json \
      --images /coco/train2017,/coco/val2017
  python -m sam_jax.data.build coco --data_dir ~/tensorflow_datasets --name lvis_v1 \
      --annotations train=/lvis/lvis_v1_train.json,validation=/lvis/lvis_v1_val.json --images /coco

read back as ``coco_format/<name>``. Segmentations are stored as compressed RLE: polygons are
rasterised at the image size and merged (pycocotools), uncompressed RLE is compressed, compressed
RLE is kept. An image is looked up as ``<folder>/<file_name>``, then (LVIS, which gives ``coco_url``)
as ``<folder>/<train2017|val2017>/<name>`` and ``<folder>/<name>``, in every ``--images`` folder.

Crowd regions (``iscrowd: 1``, one RLE over several objects) are stored with ``is_crowd`` set; the
input pipeline leaves them out of training targets unless ``include_crowd`` is on (they are not one
object), and evaluation can still read them as COCO's ignore regions. Images without any annotation,
or whose file is missing, are left out at build time (logged), as are annotations whose segmentation
cannot be read.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from sam_jax.data import record


def image_candidates(info: dict[str, Any], folders: list[epath.Path]) -> list[epath.Path]:
  """Where the file of a COCO / LVIS ``images`` entry may be, in search order."""
  names = []
  if info.get('file_name'):
    names.append(info['file_name'])
  if info.get('coco_url'):
    parts = info['coco_url'].rstrip('/').split('/')
    names += ['/'.join(parts[-2:]), parts[-1]]
  return [epath.Path(f) / n for f in folders for n in names]


def to_records(annotations: dict[str, Any], folders: list[epath.Path]):
  """(key, record) for every image with annotations and a file; logs what it leaves out."""
  by_image = collections.defaultdict(list)
  for a in annotations.get('annotations', []):
    by_image[a['image_id']].append(a)
  missing = unannotated = bad_segmentations = 0
  for info in sorted(annotations.get('images', []), key=lambda i: i['id']):
    anns = by_image.get(info['id'])
    if not anns:
      unannotated += 1
      continue
    path = next((p for p in image_candidates(info, folders) if p.exists()), None)
    if path is None:
      missing += 1
      continue
    masks = []
    for a in anns:
      try:
        counts, size = record.compressed_rle(a['segmentation'], info['height'], info['width'])
      except Exception:  # pylint: disable=broad-except  # pycocotools raises plain Exception
        bad_segmentations += 1
        continue
      masks.append(record.mask_entry(
          counts, size, bbox=a.get('bbox'), area=a.get('area', 0),
          category_id=a.get('category_id', 0), is_crowd=bool(a.get('iscrowd', 0)),
          id=a.get('id', 0)))
    yield info['id'], record.make_record(
        path.read_bytes(), masks, image_id=info['id'], file_name=path.name,
        height=info['height'], width=info['width'])
  if missing or unannotated or bad_segmentations:
    logging.warning('coco_format: left out %d images without a file, %d without annotations, '
                    '%d unreadable segmentations', missing, unannotated, bad_segmentations)


@dataclasses.dataclass(eq=False)
class CocoFormatConfig(tfds.core.BuilderConfig):
  """A COCO-format dataset: split -> annotation JSON, and the folders its images are in."""
  annotations: dict[str, str] = dataclasses.field(default_factory=dict)
  images: tuple[str, ...] = ()


class CocoFormat(record.RecordBuilder):
  """COCO / LVIS instance annotations + images (see module docstring)."""

  # No predefined config: each build names its own (``--name``), which becomes the folder.

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    if not cfg.annotations:
      raise ValueError('coco_format needs --annotations split=path.json[,split=path.json]')
    folders = [epath.Path(f) for f in cfg.images]
    return {split: self._generate_examples(path, folders) for split, path in cfg.annotations.items()}

  def _generate_examples(self, path, folders):
    with epath.Path(path).open() as f:
      annotations = json.load(f)
    yield from to_records(annotations, folders)
