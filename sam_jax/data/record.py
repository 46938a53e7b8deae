"""The record every dataset of this project is stored as (TFDS features, ArrayRecord files).

One record per image, whatever the source (SA-1B folders or tars, COCO / LVIS json, synthetic shapes):

  image           encoded file bytes as found on disk (JPEG or PNG), never re-encoded
  image_id        int64
  file_name       str
  height, width   int32, as the annotation file states them (the decoded image is the truth)
  masks           a sequence, one entry per annotation:
    counts          COCO compressed RLE string (column-major; ``pycocotools.mask.decode`` reads it)
    size            (2,) int32 [h, w] the RLE claims
    bbox            (4,) float32 [x, y, w, h] as the source gives it
    area            int64 as the source gives it
    predicted_iou   float32, SA-1B's; -1 where the source has none
    stability_score float32, SA-1B's; -1 where none
    point_coords    (2,) float32 [x, y] the point SA-1B's generator used; [-1, -1] where none
    crop_box        (4,) float32 [x, y, w, h] SA-1B's crop; [-1] * 4 where none
    category_id     int32, COCO / LVIS category; 0 where none
    is_crowd        bool, COCO ``iscrowd`` (a region of several objects)
    id              int64 annotation id

Builders store what the source says without judging it; the input pipeline checks every field
against the decoded image and skips (and counts) what does not hold.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import tensorflow_datasets as tfds
from pycocotools import mask as mask_utils

VERSION = tfds.core.Version('1.0.0')
NO_VALUE = -1.0


def features() -> tfds.features.FeaturesDict:
  """The TFDS feature spec of a record."""
  mask = tfds.features.FeaturesDict({
      'counts': tfds.features.Text(),
      'size': tfds.features.Tensor(shape=(2,), dtype=np.int32),
      'bbox': tfds.features.Tensor(shape=(4,), dtype=np.float32),
      'area': np.int64,
      'predicted_iou': np.float32,
      'stability_score': np.float32,
      'point_coords': tfds.features.Tensor(shape=(2,), dtype=np.float32),
      'crop_box': tfds.features.Tensor(shape=(4,), dtype=np.float32),
      'category_id': np.int32,
      'is_crowd': np.bool_,
      'id': np.int64,
  })
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3), doc='Encoded file bytes (JPEG / PNG).'),
      'image_id': np.int64,
      'file_name': tfds.features.Text(),
      'height': np.int32,
      'width': np.int32,
      'masks': tfds.features.Sequence(mask),
  })


# Read the image as its encoded bytes: the pipeline decodes (and may decode at reduced size).
DECODERS = {'image': tfds.decode.SkipDecoding()}


def compressed_rle(segmentation: Any, height: int, width: int) -> tuple[str, list[int]]:
  """A COCO ``segmentation`` -> (compressed RLE counts, [h, w]).

  Polygons (a list of [x0, y0, x1, y1, ...], each of 3+ points; fewer are dropped) are rasterised
  and merged at (height, width); uncompressed RLE (integer ``counts``) is compressed; compressed RLE
  is kept as is. Raises ValueError when nothing usable is left.
  """
  if isinstance(segmentation, list):
    polygons = [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
    if not polygons:
      raise ValueError('no polygon with 3 or more points')
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, int(height), int(width)))
  elif isinstance(segmentation, dict) and isinstance(segmentation.get('counts'), list):
    h, w = segmentation['size']
    rle = mask_utils.frPyObjects(segmentation, int(h), int(w))
  elif isinstance(segmentation, dict) and isinstance(segmentation.get('counts'), (str, bytes)):
    rle = segmentation
  else:
    raise ValueError(f'unknown segmentation of type {type(segmentation).__name__}')
  counts = rle['counts']
  return counts.decode() if isinstance(counts, bytes) else counts, [int(v) for v in rle['size']]


def mask_entry(counts: str | bytes, size: Iterable[int], *, bbox=None, area: int = 0,
               predicted_iou: float = NO_VALUE, stability_score: float = NO_VALUE,
               point_coords=None, crop_box=None, category_id: int = 0, is_crowd: bool = False,
               id: int = 0) -> dict[str, Any]:  # pylint: disable=redefined-builtin
  """One ``masks`` entry with defaults for what the source does not have."""
  point = np.asarray(point_coords if point_coords is not None else [NO_VALUE] * 2, np.float32)
  return {
      'counts': counts.decode() if isinstance(counts, bytes) else counts,
      'size': np.asarray(list(size), np.int32).reshape(2),
      'bbox': np.asarray(bbox if bbox is not None else [0.0] * 4, np.float32).reshape(4),
      'area': int(area),
      'predicted_iou': float(predicted_iou),
      'stability_score': float(stability_score),
      'point_coords': point.reshape(-1, 2)[0] if point.size else np.full(2, NO_VALUE, np.float32),
      'crop_box': np.asarray(crop_box if crop_box is not None else [NO_VALUE] * 4,
                             np.float32).reshape(4),
      'category_id': int(category_id),
      'is_crowd': bool(is_crowd),
      'id': int(id),
  }


def make_record(image: bytes, masks: list[dict[str, Any]], *, image_id: int, file_name: str,
                height: int, width: int) -> dict[str, Any]:
  """A record ready for the TFDS writer (``masks`` made with ``mask_entry``)."""
  return {'image': image, 'image_id': int(image_id), 'file_name': file_name,
          'height': int(height), 'width': int(width), 'masks': masks}


class RecordBuilder(tfds.core.GeneratorBasedBuilder):
  """Base of this project's builders: the record features, stored as ArrayRecord by default."""

  VERSION = VERSION
  RELEASE_NOTES = {'1.0.0': 'First release.'}

  def __init__(self, *, file_format: str | None = None, **kwargs):
    super().__init__(file_format=file_format or 'array_record', **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=features(), description=self.__doc__)
