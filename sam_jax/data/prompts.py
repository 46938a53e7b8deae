"""The first prompt of every training mask (SAM paper, Appendix A), in numpy.

With equal probability a mask is prompted by one foreground point, uniform over the mask's pixels, or
by its box with noise of standard deviation 10% of the box side per coordinate, capped at 20 px (at
the 1024 input; the cap scales with the input size). Both come out as the prompt encoder's two sparse
tokens, so every mask has the same shape of prompt:

  point: coords [[x, y], [0, 0]]     labels [1, -1]  (the official padding point for no box)
  box:   coords [[x0, y0], [x1, y1]] labels [2, 3]
"""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage

POINT_LABELS = (1, -1)
BOX_LABELS = (2, 3)
NO_PROMPT_LABELS = (-1, -1)


def default_noise_cap(image_size: int) -> float:
  """20 px at the 1024 input, proportionally less for smaller inputs."""
  return 20.0 * image_size / 1024


def noisy_boxes(boxes: np.ndarray, rng: np.random.Generator, input_hw: tuple[int, int],
                noise_fraction: float = 0.1, noise_cap: float = 20.0) -> np.ndarray:
  """(k, 4) xyxy -> the same boxes moved by N(0, (fraction * side)^2) per coordinate, each move
  clipped to +-cap, then clipped to the image and put back in order (which keeps every corner
  within ``noise_cap`` of the exact one)."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  w = boxes[:, 2] - boxes[:, 0]
  h = boxes[:, 3] - boxes[:, 1]
  std = noise_fraction * np.stack([w, h, w, h], axis=1)
  noise = np.clip(rng.normal(size=boxes.shape) * std, -noise_cap, noise_cap)
  out = boxes + noise
  out[:, 0::2] = out[:, 0::2].clip(0, input_hw[1] - 1)
  out[:, 1::2] = out[:, 1::2].clip(0, input_hw[0] - 1)
  x0, x1 = np.minimum(out[:, 0], out[:, 2]), np.maximum(out[:, 0], out[:, 2])
  y0, y1 = np.minimum(out[:, 1], out[:, 3]), np.maximum(out[:, 1], out[:, 3])
  return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)


def farthest_pixel(region: np.ndarray) -> tuple[float, tuple[int, int] | None]:
  """(h, w) bool -> (distance to the region's boundary, (y, x)) of its farthest pixel; the image
  border counts as boundary. (0.0, None) for an empty region.

  Exact Euclidean (scipy) on the region's bounding box padded by one zero pixel: every zero pixel of
  the whole image is at least as far as the nearest one of that ring, so the values, and the argmax
  (the first maximum in row-major order), are the whole image's."""
  rows = np.flatnonzero(region.any(axis=1))
  if not rows.size:
    return 0.0, None
  cols = np.flatnonzero(region.any(axis=0))
  y0, x0 = rows[0], cols[0]
  crop = np.pad(region[y0:rows[-1] + 1, x0:cols[-1] + 1], 1)  # the bbox + a zero ring
  dist = ndimage.distance_transform_edt(crop)[1:-1, 1:-1]
  y, x = np.unravel_index(np.argmax(dist), dist.shape)
  return float(dist[y, x]), (int(y0 + y), int(x0 + x))


def center_point(mask: np.ndarray) -> tuple[int, int]:
  """(h, w) bool, not empty -> (x, y): the pixel farthest from the mask's boundary (the image border
  counts as boundary), the paper's "center" click for single-point evaluation."""
  _, (y, x) = farthest_pixel(mask)
  return x, y


def center_points(counts: list[bytes], hw: tuple[int, int]) -> np.ndarray:
  """COCO compressed RLE strings of k masks of an (h, w) image -> (k, 2) float32 [x, y]: each
  mask's ``center_point``."""
  dense = mask_utils.decode([{'size': list(hw), 'counts': c} for c in counts])  # (h, w, k)
  return np.array([center_point(dense[..., i]) for i in range(dense.shape[-1])],
                  np.float32).reshape(-1, 2)


def first_prompts(points: np.ndarray, boxes: np.ndarray, rng: np.random.Generator,
                  input_hw: tuple[int, int], point_probability: float = 0.5,
                  noise_fraction: float = 0.1, noise_cap: float = 20.0
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Points (k, 2) xy and exact boxes (k, 4) xyxy, all in the input frame ->
  coords (k, 2, 2) float32 and labels (k, 2) int32, a point or a noisy box per mask."""
  points = np.asarray(points, np.float32).reshape(-1, 2)
  k = len(points)
  is_point = rng.random(k) < point_probability  # (k,)
  noisy = noisy_boxes(boxes, rng, input_hw, noise_fraction, noise_cap)
  point_coords = np.stack([points, np.zeros_like(points)], axis=1)  # (k, 2, 2)
  coords = np.where(is_point[:, None, None], point_coords, noisy.reshape(k, 2, 2))
  labels = np.where(is_point[:, None], np.array(POINT_LABELS), np.array(BOX_LABELS))
  return coords.astype(np.float32), labels.astype(np.int32)
