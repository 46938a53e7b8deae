"""Mask utilities of the automatic mask generator (official ``segment_anything.utils.amg``).

Point grids and crop boxes are the official numpy / Python code paths. Per-mask statistics (boxes,
stability scores, crop-edge tests) and greedy NMS are jax functions meant to run inside ``jax.jit``
on fixed shapes. Run-length encoding and small-region cleanup are the host side, one mask at a time.
"""
from __future__ import annotations

import math
from itertools import product
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# --- point grids and crops (host) ---------------------------------------------------------------


def build_point_grid(n_per_side: int) -> np.ndarray:
  """(n^2, 2) (x, y) points evenly spaced in [0, 1]^2, row by row."""
  offset = 1 / (2 * n_per_side)
  side = np.linspace(offset, 1 - offset, n_per_side)
  xs = np.tile(side[None, :], (n_per_side, 1))
  ys = np.tile(side[:, None], (1, n_per_side))
  return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int,
                                scale_per_layer: int) -> list[np.ndarray]:
  """One grid per crop layer, n_per_side / scale_per_layer^i points a side in layer i."""
  return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(im_size: tuple[int, ...], n_layers: int,
                        overlap_ratio: float) -> tuple[list[list[int]], list[int]]:
  """XYXY crop boxes (the whole image, then (2^i)^2 overlapping crops in layer i), their layers."""
  im_h, im_w = im_size
  short_side = min(im_h, im_w)
  crop_boxes, layer_idxs = [[0, 0, im_w, im_h]], [0]

  def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
    return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

  for i_layer in range(n_layers):
    n_crops_per_side = 2**(i_layer + 1)
    overlap = int(overlap_ratio * short_side * (2 / n_crops_per_side))
    crop_w = crop_len(im_w, n_crops_per_side, overlap)
    crop_h = crop_len(im_h, n_crops_per_side, overlap)
    x0s = [int((crop_w - overlap) * i) for i in range(n_crops_per_side)]
    y0s = [int((crop_h - overlap) * i) for i in range(n_crops_per_side)]
    for x0, y0 in product(x0s, y0s):
      crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
      layer_idxs.append(i_layer + 1)
  return crop_boxes, layer_idxs


def box_xyxy_to_xywh(box: np.ndarray) -> np.ndarray:
  box = np.array(box)
  box[2:] -= box[:2]
  return box


# --- per-mask statistics and NMS (device, inside jit) -------------------------------------------


def mask_to_box(mask: jax.Array) -> jax.Array:
  """(..., H, W) bool -> (..., 4) int32 XYXY of the inclusive pixel extents ([0] * 4 if empty)."""
  h, w = mask.shape[-2:]

  def extent(present: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    idx = jnp.arange(n, dtype=jnp.int32)
    return jnp.min(jnp.where(present, idx, n), -1), jnp.max(jnp.where(present, idx, 0), -1)

  top, bottom = extent(jnp.any(mask, -1), h)
  left, right = extent(jnp.any(mask, -2), w)
  box = jnp.stack([left, top, right, bottom], -1)
  empty = (right < left) | (bottom < top)
  return jnp.where(empty[..., None], 0, box)


def stability_score(logits: jax.Array, mask_threshold: float, offset: jax.Array) -> jax.Array:
  """IoU of the masks thresholded at ``mask_threshold`` +- ``offset``: (..., H, W) -> (...,)."""
  inter = jnp.sum(logits > mask_threshold + offset, (-2, -1), dtype=jnp.int32)
  union = jnp.sum(logits > mask_threshold - offset, (-2, -1), dtype=jnp.int32)
  return inter.astype(jnp.float32) / union.astype(jnp.float32)


def is_box_near_crop_edge(boxes: jax.Array, crop_box: jax.Array, orig_box: jax.Array,
                          atol: float = 20.0) -> jax.Array:
  """(N, 4) XYXY boxes in the crop frame -> (N,) True where a side lies within ``atol`` of a crop
  edge that is not also an image edge."""
  boxes = (boxes + jnp.tile(crop_box[:2], 2)).astype(jnp.float32)
  near_crop = jnp.abs(boxes - crop_box.astype(jnp.float32)) <= atol
  near_image = jnp.abs(boxes - orig_box.astype(jnp.float32)) <= atol
  return jnp.any(near_crop & ~near_image, -1)


@jax.jit
def nms(boxes: jax.Array, scores: jax.Array, n_valid: jax.Array,
        iou_threshold: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Greedy NMS as torchvision's ``nms``: boxes (N, 4) float XYXY, scores (N,); the first
  ``n_valid`` entries are real, the rest padding.

  Returns ``order`` (N,), the indices by decreasing score (ties in index order), and ``keep`` (N,)
  over that order: the kept indices are ``order[keep]``, highest score first. One vector step per
  box; no N x N matrix.
  """
  n = boxes.shape[0]
  valid = jnp.arange(n) < n_valid
  order = jnp.argsort(jnp.where(valid, -scores, jnp.inf), stable=True)
  b = boxes[order].astype(jnp.float32)
  area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  later = jnp.arange(n)

  def suppress(i, keep):
    lt = jnp.maximum(b[i, :2], b[:, :2])
    rb = jnp.minimum(b[i, 2:], b[:, 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    inter = wh[:, 0] * wh[:, 1]
    iou = inter / (area[i] + area - inter)
    return keep & ~(keep[i] & (iou > iou_threshold) & (later > i))

  return order, jax.lax.fori_loop(0, n_valid, suppress, valid)


def run_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float,
            size: int) -> np.ndarray:
  """``nms`` of host arrays padded to ``size`` entries (so one compilation serves every call of
  that size): the kept indices, highest score first."""
  n = len(boxes)
  if n > size:
    raise ValueError(f'{n} boxes do not fit the NMS size {size}')
  padded_boxes = np.zeros((size, 4), np.float32)
  padded_boxes[:n] = boxes
  padded_scores = np.zeros(size, np.float32)
  padded_scores[:n] = scores
  order, keep = nms(padded_boxes, padded_scores, np.int32(n), np.float32(iou_threshold))
  return np.asarray(order)[np.asarray(keep)]


# --- run-length encoding and region cleanup (host) ----------------------------------------------


def mask_to_rle(mask_t: np.ndarray) -> dict[str, Any]:
  """Uncompressed COCO RLE of one mask given transposed, (W, H) bool (column-major order)."""
  w, h = mask_t.shape
  flat = mask_t.reshape(-1)
  change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  counts = np.diff(np.concatenate([[0], change, [h * w]]))
  return {'size': [h, w], 'counts': ([] if flat[0] == 0 else [0]) + counts.tolist()}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
  """(H, W) bool from an uncompressed RLE."""
  h, w = rle['size']
  counts = np.asarray(rle['counts'], np.int64)
  values = np.arange(len(counts)) % 2 == 1
  return np.repeat(values, counts).reshape(w, h).T


def area_from_rle(rle: dict[str, Any]) -> int:
  return sum(rle['counts'][1::2])


def coco_encode_rle(rle: dict[str, Any]) -> dict[str, Any]:
  """Compressed COCO RLE (counts a str, JSON-ready) from an uncompressed one."""
  from pycocotools import mask as mask_utils
  h, w = rle['size']
  out = mask_utils.frPyObjects(rle, h, w)
  out['counts'] = out['counts'].decode('utf-8')
  return out


def remove_small_regions(mask: np.ndarray, area_thresh: float,
                         mode: str) -> tuple[np.ndarray, bool]:
  """Removes holes (``mode="holes"``) or islands (``"islands"``) smaller than ``area_thresh``
  (8-connectivity, OpenCV as the official); returns the mask and whether it changed."""
  import cv2
  if mode not in ('holes', 'islands'):
    raise ValueError(f'mode must be "holes" or "islands", got {mode!r}')
  holes = mode == 'holes'
  n_labels, regions, stats, _ = cv2.connectedComponentsWithStats((holes ^ mask).astype(np.uint8), 8)
  sizes = stats[1:, -1]  # row 0 is the background
  small = np.flatnonzero(sizes < area_thresh) + 1
  if len(small) == 0:
    return mask, False
  fill = np.concatenate([[0], small])
  if not holes:
    fill = np.setdiff1d(np.arange(n_labels), fill)
    if len(fill) == 0:  # every region is small: keep the largest
      fill = np.array([int(np.argmax(sizes)) + 1])
  return np.isin(regions, fill), True


def host_mask_to_box(mask: np.ndarray) -> np.ndarray:
  """``mask_to_box`` of one (H, W) bool mask in numpy: (4,) int64."""
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  if len(rows) == 0:
    return np.zeros(4, np.int64)
  return np.array([cols[0], rows[0], cols[-1], rows[-1]], np.int64)
