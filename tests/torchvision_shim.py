"""Stands in for the four torchvision functions `segment_anything==1.0` imports.

PyPI's torchvision does not import beside the CPU torch build used here, and segment-anything imports
`resize` / `to_pil_image` (for ResizeLongestSide) and `batched_nms` / `box_area` (for the automatic mask
generator) at import time. These reimplement torchvision's documented behaviour for the inputs SAM
gives them (PIL images; float boxes).
"""
from __future__ import annotations

import importlib.machinery
import sys
import types

import numpy as np


def _resize(img, size, interpolation=None, max_size=None, antialias=True):
  from PIL import Image
  h, w = size  # torchvision: size is (h, w); PIL takes (w, h), bilinear by default
  return img.resize((w, h), Image.BILINEAR)


def _to_pil_image(pic, mode=None):
  from PIL import Image
  return Image.fromarray(np.asarray(pic), mode)


def _box_area(boxes):
  return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _nms(boxes, scores, iou_threshold):
  import torch
  order = torch.argsort(scores, descending=True)
  boxes = boxes[order]
  area = _box_area(boxes)
  lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
  rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
  inter = (rb - lt).clamp(min=0).prod(-1)
  iou = inter / (area[:, None] + area[None, :] - inter)
  keep = torch.ones(len(boxes), dtype=torch.bool)
  for i in range(len(boxes)):
    if keep[i]:
      suppress = iou[i] > iou_threshold
      suppress[: i + 1] = False
      keep &= ~suppress
  return order[keep]


def _batched_nms(boxes, scores, idxs, iou_threshold):
  import torch
  if boxes.numel() == 0:
    return torch.empty((0,), dtype=torch.int64)
  offsets = idxs.to(boxes) * (boxes.max() + 1)
  return _nms(boxes + offsets[:, None], scores, iou_threshold)


def install() -> None:
  """Puts the stand-in into sys.modules unless a working torchvision is importable."""
  try:
    import torchvision.ops.boxes  # noqa: F401
    import torchvision.transforms.functional  # noqa: F401
    return
  except Exception:  # noqa: BLE001 - any failure means we provide our own
    pass
  try:  # transformers caches whether torchvision exists: let it see the truth before the stand-in
    from transformers.utils import import_utils
    import_utils.is_torchvision_available()
  except ImportError:
    pass
  for name in [m for m in sys.modules if m == 'torchvision' or m.startswith('torchvision.')]:
    del sys.modules[name]
  tv = types.ModuleType('torchvision')
  transforms = types.ModuleType('torchvision.transforms')
  functional = types.ModuleType('torchvision.transforms.functional')
  functional.resize, functional.to_pil_image = _resize, _to_pil_image
  ops = types.ModuleType('torchvision.ops')
  boxes = types.ModuleType('torchvision.ops.boxes')
  boxes.batched_nms, boxes.box_area, boxes.nms = _batched_nms, _box_area, _nms
  tv.transforms, transforms.functional, tv.ops, ops.boxes = transforms, functional, ops, boxes
  for module in (tv, transforms, functional, ops, boxes):
    module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    sys.modules[module.__name__] = module
