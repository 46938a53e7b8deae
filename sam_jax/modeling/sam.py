"""The composed SAM model and the pure pieces around it (pre- and post-processing)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sam_jax.modeling.config import SamConfig
from sam_jax.modeling.image_encoder import ImageEncoderViT
from sam_jax.modeling.layers import Conv2d, ConvTranspose2x2, Linear
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

  def decode(self, image_embeddings, coords, labels, mask_input=None, *,
             multimask_output: bool | str, image_pe=None, drop=None, mask_given=None):
    """Low-res mask logits (B, C, 4g, 4g) and IoU predictions (B, C) (C = 3, 1, or 4 for 'all').

    image_embeddings (1 or B, g, g, C); coords (B, N, 2) in the input frame; labels (B, N) (see
    ``prompt_encoder``); mask_input (B, 4g, 4g) logits or None; image_pe: the prompt encoder's
    ``get_dense_pe()``, recomputed when None; drop: (key, rate) for decoder dropout in training;
    mask_given: bool, where False the mask input counts as None (``PromptEncoder``).
    """
    masks = None if mask_input is None else mask_input[..., None]
    sparse, dense = self.prompt_encoder(coords, labels, masks, mask_given)
    if image_pe is None:
      image_pe = self.prompt_encoder.get_dense_pe()
    return self.mask_decoder(image_embeddings, image_pe, sparse, dense, multimask_output,
                             labels != PAD_LABEL, drop)


# What cast_for_inference casts: the kernel and bias of these layers, and these parameters (all of
# them are cast to the compute dtype where they are used).
WEIGHT_LAYERS = (Linear, Conv2d, ConvTranspose2x2)
CAST_PARAMS = (('image_encoder', 'pos_embed'),)


def cast_for_inference(model: Sam, dtype: str = 'bfloat16') -> Sam:
  """A copy of ``model`` that computes in ``dtype`` with its matmul and convolution weights stored
  in ``dtype``: cast here, once, instead of inside every jitted call.

  Only the kernels and biases of ``WEIGHT_LAYERS`` and ``CAST_PARAMS`` change (all but 0.3% of the
  bytes of vit_b, 0.1% of vit_h); LayerNorms, relative-position tables, learned tokens and the
  prompt encoder's random Fourier matrix stay float32, as the layers read them in float32 anyway (or
  cast small tables per call). The result equals, bit for bit, a model built with ``dtype`` as
  compute dtype and float32 parameters (tests/test_batched_inference.py). For inference: training
  wants float32 master weights.
  """
  dtype = jnp.dtype(dtype)
  cfg = model.config.replace(dtype=dtype.name)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Sam(cfg, rngs=nnx.Rngs(0))))
  weights = {path + (name,) for path, node in nnx.iter_graph(model)
             if isinstance(node, WEIGHT_LAYERS) for name in ('kernel', 'bias')} | set(CAST_PARAMS)
  flat = [(path, var.replace(var[...].astype(dtype)) if path in weights else var)
          for path, var in nnx.to_flat_state(nnx.state(model))]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


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
def postprocess_weights(low_res: int, image_size: int, input_size: tuple[int, int],
                        original_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The official postprocess (bilinear up to S, crop to the input size, bilinear to the original
  size) as separable weights on the low-res logits: the row taps, (H, K) indices and (H, K)
  weights (each output row mixes K <= 4 low-res rows), and the dense (W, L) column matrix."""
  up_rows, up_cols = (bilinear_matrix(low_res, image_size)[:n] for n in input_size)  # (input, L)
  rows = bilinear_matrix(input_size[0], original_size[0]) @ up_rows  # (H, L)
  cols = bilinear_matrix(input_size[1], original_size[1]) @ up_cols  # (W, L)
  k = int((rows != 0).sum(1).max())
  idx = np.argsort(rows == 0, axis=1, kind='stable')[:, :k]  # the nonzero columns first
  return (idx.astype(np.int32), np.take_along_axis(rows, idx, 1).astype(np.float32),
          cols.astype(np.float32))


def postprocess_masks(low_res: jax.Array, rows_idx, rows_w, cols) -> jax.Array:
  """(..., L, L) logits -> (..., H, W) with the weights of ``postprocess_weights``.

  Columns by a small matrix product, rows by K gathers of whole rows: on CPU this is several times
  faster than either two products or two gathers.
  """
  x = jnp.einsum('...yx,wx->...yw', low_res, cols, precision=jax.lax.Precision.HIGHEST)
  return sum(jnp.take(x, rows_idx[:, k], axis=-2) * rows_w[:, k, None]
             for k in range(rows_idx.shape[1]))  # (..., H, W)
