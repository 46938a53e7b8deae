"""SAM's prompt encoder (official ``segment_anything.modeling.prompt_encoder``), with fixed shapes.

Sparse prompts are one (B, N, 2) array of coordinates in the model's input frame and one (B, N) array
of labels: 1 foreground point, 0 background point, 2 / 3 box top-left / bottom-right corner,
-1 the official "not a point" padding point, and ``PAD_LABEL`` for slots that do not exist. PAD slots
embed to zero and the mask decoder masks them out of attention, so padding a prompt to a fixed
length (for one compiled shape per bucket) gives exactly the result of the unpadded prompt.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sam_jax.modeling.config import SamConfig
from sam_jax.modeling.layers import (Activation, Buffer, Conv2d, Embedding, LayerNorm, normal,
                                     run_sequential, with_precision)

PAD_LABEL = -2
NOT_A_POINT_LABEL = -1


class PositionEmbeddingRandom(nnx.Module):
  """Random Fourier features of normalised (x, y) coordinates; the Gaussian matrix is a buffer."""

  def __init__(self, num_pos_feats: int, *, rngs: nnx.Rngs):
    self.positional_encoding_gaussian_matrix = Buffer(
        normal(rngs.params(), (2, num_pos_feats), jnp.float32))

  def _pe_encoding(self, coords: jax.Array) -> jax.Array:
    """coords in [0, 1], (..., 2) -> (..., 2 * num_pos_feats)."""
    coords = 2 * coords - 1
    coords = coords @ self.positional_encoding_gaussian_matrix[...]
    coords = 2 * math.pi * coords
    return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

  def __call__(self, size: tuple[int, int]) -> jax.Array:
    """Dense (H, W, C) encoding of pixel centres of an H x W grid."""
    h, w = size
    y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    grid = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)  # (H, W, 2) as (x, y)
    return self._pe_encoding(grid)

  def forward_with_coords(self, coords: jax.Array, image_size: tuple[int, int]) -> jax.Array:
    """(B, N, 2) pixel (x, y) -> (B, N, C)."""
    coords = coords / jnp.array([image_size[1], image_size[0]], jnp.float32)
    return self._pe_encoding(coords.astype(jnp.float32))


class PromptEncoder(nnx.Module):
  """Points, boxes and a mask prompt -> sparse (B, N, C) and dense (B, g, g, C) embeddings."""

  def __init__(self, cfg: SamConfig, *, rngs: nnx.Rngs):
    dim, g, chans, dtype = cfg.prompt_embed_dim, cfg.grid_size, cfg.mask_in_chans, cfg.compute_dtype
    self.embed_dim = dim
    self.image_embedding_size = (g, g)
    self.input_image_size = (cfg.image_size, cfg.image_size)
    self.mask_input_size = (4 * g, 4 * g)
    self.pe_layer = PositionEmbeddingRandom(dim // 2, rngs=rngs)
    self.point_embeddings = nnx.List([Embedding(1, dim, rngs=rngs) for _ in range(4)])
    self.not_a_point_embed = Embedding(1, dim, rngs=rngs)
    self.mask_downscaling = nnx.List([
        Conv2d(1, chans // 4, 2, stride=2, axes=(None,) * 4, dtype=dtype, rngs=rngs),
        LayerNorm(chans // 4, eps=1e-6, axis_name=None, dtype=dtype),
        Activation('gelu'),
        Conv2d(chans // 4, chans, 2, stride=2, axes=(None,) * 4, dtype=dtype, rngs=rngs),
        LayerNorm(chans, eps=1e-6, axis_name=None, dtype=dtype),
        Activation('gelu'),
        Conv2d(chans, dim, 1, axes=(None, None, None, 'embed'), dtype=dtype, rngs=rngs),
    ])
    self.no_mask_embed = Embedding(1, dim, rngs=rngs)
    self.precision = cfg.matmul_precision

  @with_precision
  def get_dense_pe(self) -> jax.Array:
    """(1, g, g, C) positional encoding of the image embedding grid."""
    return self.pe_layer(self.image_embedding_size)[None]

  @with_precision
  def embed_points(self, coords: jax.Array, labels: jax.Array) -> jax.Array:
    """(B, N, 2), (B, N) -> (B, N, C) sparse embeddings (PAD slots are zero)."""
    pe = self.pe_layer.forward_with_coords(coords + 0.5, self.input_image_size)
    labels = labels[..., None]
    out = jnp.where(labels == NOT_A_POINT_LABEL, self.not_a_point_embed.weight[0], pe)
    for i, embedding in enumerate(self.point_embeddings):
      out = jnp.where(labels == i, pe + embedding.weight[0], out)
    return jnp.where(labels == PAD_LABEL, 0.0, out)

  @with_precision
  def embed_masks(self, masks: jax.Array) -> jax.Array:
    """(B, 4g, 4g, 1) mask logits -> (B, g, g, C)."""
    return run_sequential(self.mask_downscaling, masks)

  def __call__(self, coords: jax.Array, labels: jax.Array, masks: jax.Array | None = None,
               mask_given: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Returns sparse (B, N, C) and dense (B, g, g, C) embeddings.

    masks: (B, 4g, 4g, 1) logits, or None for ``no_mask_embed`` (as the official ``masks=None``).
    mask_given: optional bool, a traced scalar or (B,): where False, ``no_mask_embed`` as if
    ``masks`` were None (one program for rounds with and without a mask prompt).
    """
    sparse = self.embed_points(coords, labels)
    no_mask = jnp.broadcast_to(self.no_mask_embed.weight[0],
                               (coords.shape[0], *self.image_embedding_size, self.embed_dim))
    if masks is None:
      return sparse, no_mask
    dense = self.embed_masks(masks).astype(jnp.float32)
    if mask_given is not None:
      dense = jnp.where(jnp.reshape(mask_given, (-1, 1, 1, 1)), dense, no_mask)
    return sparse, dense
