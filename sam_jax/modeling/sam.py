"""The composed SAM model and the pure pieces around it (pre- and post-processing)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sam_jax.modeling.config import SamConfig
from sam_jax.modeling.image_encoder import ImageEncoderViT
from sam_jax.modeling.mask_decoder import MaskDecoder
from sam_jax.modeling.prompt_encoder import PAD_LABEL, PromptEncoder


class Sam(nnx.Module):
  """Image encoder + prompt encoder + mask decoder, attribute names as in the official ``Sam``."""
  mask_threshold: float = 0.0
  image_format: str = 'RGB'

  def __init__(self, cfg: SamConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.image_encoder = ImageEncoderViT(cfg, rngs=rngs)
    self.prompt_encoder = PromptEncoder(cfg, rngs=rngs)
    self.mask_decoder = MaskDecoder(cfg, rngs=rngs)

  @property
  def image_size(self) -> int:
    return self.config.image_size

  def embed_images(self, images: jax.Array) -> jax.Array:
    """(B, S, S, 3) normalised, padded -> (B, g, g, C) image embeddings."""
    return self.image_encoder(images)

  def decode(self, image_embeddings, coords, labels, mask_input, has_mask):
    """Low-res logits (B, 4, 4g, 4g) and IoU predictions (B, 4) for all four mask tokens.

    image_embeddings (1 or B, g, g, C); coords (B, N, 2) in the input frame; labels (B, N) (see
    ``prompt_encoder``); mask_input (B, 4g, 4g) logits, used where has_mask (B,) is true.
    """
    sparse, dense = self.prompt_encoder(coords, labels, mask_input[..., None], has_mask)
    return self.mask_decoder(image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense,
                             labels != PAD_LABEL)


def select_masks(low_res: jax.Array, iou: jax.Array, multimask_output: bool):
  """Official output selection: masks 1..3 for multimask output, else mask 0."""
  s = slice(1, None) if multimask_output else slice(0, 1)
  return low_res[:, s], iou[:, s]


@functools.lru_cache(maxsize=64)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix of torch's bilinear interpolation (align_corners=False, no antialias).

  Source positions are computed in float32 as torch does, so the weights match torch's bit for bit.
  """
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  src = np.maximum(scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5), f32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  frac = (src - i0.astype(f32)).astype(np.float64)
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), i0), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), i1), frac)
  return m


@functools.lru_cache(maxsize=64)
def postprocess_matrices(low_res: int, image_size: int, input_size: tuple[int, int],
                         original_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """Row / column matrices of the official postprocess: upsample to S, crop to input, resize."""
  mats = []
  for axis in range(2):
    up = bilinear_matrix(low_res, image_size)[:input_size[axis]]  # (input, low)
    mats.append((bilinear_matrix(input_size[axis], original_size[axis]) @ up).astype(np.float32))
  return mats[0], mats[1]


def postprocess_masks(low_res: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
  """(..., L, L) logits -> (..., H, W) with the (H, L) / (W, L) matrices of postprocess_matrices."""
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum('...yx,wx->...yw', low_res, cols, precision=hi)
  return jnp.einsum('hy,...yw->...hw', rows, x, precision=hi)
