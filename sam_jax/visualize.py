"""Pictures of masks and prompts: overlays written as PNG with Pillow (no plotting library needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PALETTE = np.array([[30, 144, 255], [255, 99, 71], [50, 205, 50], [255, 215, 0], [186, 85, 211],
                    [0, 206, 209], [255, 140, 0], [199, 21, 133]], np.float32)


def overlay(image: np.ndarray, masks: np.ndarray, points: np.ndarray | None = None,
            labels: np.ndarray | None = None, box: np.ndarray | None = None,
            alpha: float = 0.5) -> np.ndarray:
  """HxWx3 uint8 image with (N, H, W) boolean masks tinted on top, points (green = foreground,
  red = background) and a box drawn; returns HxWx3 uint8."""
  out = image.astype(np.float32)
  for i, mask in enumerate(np.asarray(masks, bool).reshape(-1, *image.shape[:2])):
    color = PALETTE[i % len(PALETTE)]
    out[mask] = (1 - alpha) * out[mask] + alpha * color
  pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(pil)
  r = max(3, min(image.shape[:2]) // 80)
  if points is not None:
    labels = np.ones(len(points)) if labels is None else labels
    for (x, y), lab in zip(np.asarray(points), labels):
      fill = (0, 220, 0) if lab == 1 else (230, 0, 0)
      draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(255, 255, 255))
  if box is not None:
    draw.rectangle([float(v) for v in np.asarray(box).reshape(4)], outline=(0, 255, 0),
                   width=max(2, r // 2))
  return np.asarray(pil)


def save_overlay(path: str | Path, image: np.ndarray, masks: np.ndarray, **kwargs) -> Path:
  """Writes ``overlay(image, masks, **kwargs)`` as a PNG; returns the path."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(overlay(image, masks, **kwargs)).save(path)
  return path
