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


# --- matplotlib helpers, as in the official notebooks ---------------------------------------------


def show_mask(mask: np.ndarray, ax, random_color: bool = False) -> None:
  """Draws an (H, W) boolean mask on a matplotlib axis in translucent blue (or a random colour)."""
  if random_color:
    color = np.concatenate([np.random.random(3), [0.6]])
  else:
    color = np.array([30 / 255, 144 / 255, 255 / 255, 0.6])
  h, w = mask.shape[-2:]
  ax.imshow(np.asarray(mask).reshape(h, w, 1) * color.reshape(1, 1, -1))


def show_points(coords: np.ndarray, labels: np.ndarray, ax, marker_size: int = 375) -> None:
  """Foreground points as green stars, background points as red stars."""
  coords, labels = np.asarray(coords), np.asarray(labels)
  for label, color in ((1, 'green'), (0, 'red')):
    pts = coords[labels == label]
    ax.scatter(pts[:, 0], pts[:, 1], color=color, marker='*', s=marker_size, edgecolor='white',
               linewidth=1.25)


def show_box(box: np.ndarray, ax) -> None:
  """An XYXY box as a green rectangle."""
  import matplotlib.pyplot as plt
  x0, y0, x1, y1 = np.asarray(box, float).reshape(4)
  ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, edgecolor='green',
                             facecolor=(0, 0, 0, 0), lw=2))


def show_anns(anns: list[dict], ax=None) -> None:
  """Automatic-mask-generator output (binary_mask mode), largest first, in random colours."""
  import matplotlib.pyplot as plt
  if not anns:
    return
  ax = ax or plt.gca()
  ax.set_autoscale_on(False)
  anns = sorted(anns, key=lambda a: a['area'], reverse=True)
  h, w = anns[0]['segmentation'].shape
  img = np.ones((h, w, 4))
  img[:, :, 3] = 0
  for ann in anns:
    img[ann['segmentation']] = np.concatenate([np.random.random(3), [0.35]])
  ax.imshow(img)
