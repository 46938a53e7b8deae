"""Reading the TFDS catalogue's own ``segment_anything`` dataset (v1.0.0) as this project's records.

Its examples hold the same SA-1B facts under other names: ``image/content`` for the JPEG,
``annotations`` for the masks (``segmentation/counts``, ``segmentation/size``), boxes normalised to
[ymin, xmin, ymax, xmax] and ``point_coords`` of shape (1, 2). ``to_record`` maps one example (TFDS
numpy form, image left encoded) to ``sam_jax.data.record``'s fields.

Build it with the catalogue builder as ArrayRecord (random access needs it; it downloads SA-1B
from the links file and needs apache-beam):

  tfds build segment_anything --data_dir D --manual_dir M --file_format array_record

A copy already built as TFRecord converts in place:

  tfds convert_format --dataset_version_dir D/segment_anything/1.0.0 --out_file_format array_record
"""
from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow_datasets as tfds

DECODERS = {'image': {'content': tfds.decode.SkipDecoding()}}


def _xywh(tfds_boxes: Any, height: int, width: int) -> np.ndarray:
  """(n, 4) normalised [ymin, xmin, ymax, xmax] -> (n, 4) float32 absolute [x, y, w, h]."""
  b = np.asarray(tfds_boxes, np.float64).reshape(-1, 4)
  x, y = b[:, 1] * width, b[:, 0] * height
  return np.stack([x, y, b[:, 3] * width - x, b[:, 2] * height - y], axis=1).astype(np.float32)


def to_record(example: dict[str, Any]) -> dict[str, Any]:
  """A ``segment_anything`` example -> a record as ``record.features()`` reads back."""
  image, ann = example['image'], example['annotations']
  h, w = int(image['height']), int(image['width'])
  n = len(ann['segmentation']['counts'])
  return {
      'image': image['content'],
      'image_id': int(image['image_id']),
      'file_name': image['file_name'],
      'height': h,
      'width': w,
      'masks': {
          'counts': list(ann['segmentation']['counts']),
          'size': np.asarray(ann['segmentation']['size'], np.int64).reshape(n, 2).astype(np.int32),
          'bbox': _xywh(ann['bbox'], h, w),
          'area': np.asarray(ann['area'], np.int64).reshape(n),
          'predicted_iou': np.asarray(ann['predicted_iou'], np.float32).reshape(n),
          'stability_score': np.asarray(ann['stability_score'], np.float32).reshape(n),
          'point_coords': np.asarray(ann['point_coords'], np.float32).reshape(n, -1, 2)[:, 0],
          'crop_box': _xywh(ann['crop_box'], h, w),
          'category_id': np.zeros(n, np.int32),
          'is_crowd': np.zeros(n, bool),
          'id': np.asarray(ann['id'], np.int64).reshape(n),
      },
  }
