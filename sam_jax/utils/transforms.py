"""Resizing and coordinate transforms of the official ``ResizeLongestSide``, in numpy + PIL."""
from __future__ import annotations

import numpy as np
from PIL import Image

from sam_jax.modeling.config import PIXEL_MEAN, PIXEL_STD


def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
  """The official resized size; at least 1 px per side (where the official would fail)."""
  scale = long_side_length * 1.0 / max(oldh, oldw)
  return max(1, int(oldh * scale + 0.5)), max(1, int(oldw * scale + 0.5))


class ResizeLongestSide:
  """Resizes images to longest side ``target_length`` (PIL bilinear) and moves coordinates along."""

  def __init__(self, target_length: int):
    self.target_length = target_length

  def apply_image(self, image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> resized uint8."""
    h, w = get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))

  def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
    old_h, old_w = original_size
    new_h, new_w = get_preprocess_shape(old_h, old_w, self.target_length)
    coords = np.array(coords, dtype=float)
    coords[..., 0] = coords[..., 0] * (new_w / old_w)
    coords[..., 1] = coords[..., 1] * (new_h / old_h)
    return coords

  def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
    boxes = self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size)
    return boxes.reshape(-1, 4)


def normalize_and_pad(image: np.ndarray, size: int) -> np.ndarray:
  """hxwx3 uint8 (already resized) -> (size, size, 3) float32, normalised, zero-padded bottom/right."""
  x = (image.astype(np.float32) - np.array(PIXEL_MEAN, np.float32)) / np.array(PIXEL_STD, np.float32)
  out = np.zeros((size, size, 3), np.float32)
  out[:x.shape[0], :x.shape[1]] = x
  return out
