"""SAM's two-way transformer (official ``segment_anything.modeling.transformer``).

Tokens may carry a validity mask: invalid tokens (prompt padding) are removed from attention as keys,
which makes them exactly inert.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sam_jax.modeling.layers import LayerNorm, Linear, MLPBlock


def dropout(x: jax.Array, drop: tuple[jax.Array, float] | None, index: int) -> jax.Array:
  """Inverted dropout of a residual branch in training; ``drop`` = (key, rate), None at inference.
  ``index`` names the branch, so every branch draws its own mask from the one key."""
  if drop is None:
    return x
  key, rate = drop
  keep = jax.random.bernoulli(jax.random.fold_in(key, index), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Attention(nnx.Module):
  """Attention with q/k/v projections to ``dim // downsample_rate`` (official names).

  The decoder's cross-attention sees a few prompt tokens on one side and the g x g image on the
  other. When ``heads x tokens`` is under the projected width, projecting the image's side costs
  more than attending: then the projections on that side are folded into the tokens' (the same
  products, reassociated; outputs equal to ~1e-6 of their scale). In vit_b's decoder with 8
  tokens, each cross-attention's two (4096, 256) x (256, 128) projections of the image become two
  products of width 64 (heads x tokens).
  """

  def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1, *, dtype, rngs):
    internal = dim // downsample_rate
    assert internal % num_heads == 0, 'num_heads must divide embedding_dim // downsample_rate'
    self.num_heads = num_heads
    self.q_proj = Linear(dim, internal, axes=('embed', 'qkv'), dtype=dtype, rngs=rngs)
    self.k_proj = Linear(dim, internal, axes=('embed', 'qkv'), dtype=dtype, rngs=rngs)
    self.v_proj = Linear(dim, internal, axes=('embed', 'qkv'), dtype=dtype, rngs=rngs)
    self.out_proj = Linear(internal, dim, axes=('qkv', 'embed'), dtype=dtype, rngs=rngs)
    self.dtype = dtype

  def __call__(self, q, k, v, key_mask: jax.Array | None = None) -> jax.Array:
    """q (B, Nq, C), k / v (B, Nk, C), key_mask (B, Nk) bool or None -> (B, Nq, C)."""
    nq, nk, width = q.shape[1], k.shape[1], self.q_proj.kernel.shape[1]
    if isinstance(nq, int) and isinstance(nk, int):  # not symbolic (jax.export): fold if cheaper
      if nk < nq and self.num_heads * nk < width:
        return self._few_keys(q, k, v, key_mask)
      if nq < nk and self.num_heads * nq < width:
        return self._few_queries(q, k, v, key_mask)
    return self._projected(q, k, v, key_mask)

  def _projected(self, q, k, v, key_mask):
    """The official form: project q, k and v, attend per head, project out."""
    n = self.num_heads
    # (B, N, C) -> (B, heads, N, d): batched matmuls over (B, heads) run ~4x faster on CPU than
    # the same contraction as one einsum over the (B, N, heads, d) layout.
    q = self.q_proj(q)
    q = q.reshape(*q.shape[:2], n, -1).transpose(0, 2, 1, 3)
    k = self.k_proj(k)
    k = k.reshape(*k.shape[:2], n, -1).transpose(0, 2, 1, 3)
    v = self.v_proj(v)
    v = v.reshape(*v.shape[:2], n, -1).transpose(0, 2, 1, 3)
    logits = jnp.matmul(q, k.swapaxes(-1, -2)) / jnp.sqrt(jnp.float32(q.shape[-1])).astype(q.dtype)
    logits = logits.astype(jnp.float32)  # (B, heads, Nq, Nk)
    if key_mask is not None:
      logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.matmul(attn, v).transpose(0, 2, 1, 3)  # (B, Nq, heads, d)
    return self.out_proj(out.reshape(*out.shape[:2], -1))

  def _heads(self, layer: Linear) -> tuple[jax.Array, jax.Array]:
    """A projection's kernel (C, heads, d) and bias (heads, d) in the compute dtype."""
    kernel, bias = layer.kernel[...].astype(self.dtype), layer.bias[...].astype(self.dtype)
    return kernel.reshape(kernel.shape[0], self.num_heads, -1), bias.reshape(self.num_heads, -1)

  def _few_keys(self, q, k, v, key_mask):
    """Many queries, few keys (image -> tokens): q_proj folded into the keys, v_proj and
    out_proj into the values."""
    b, nq, c = q.shape
    n, nk = self.num_heads, k.shape[1]
    wq, bq = self._heads(self.q_proj)
    kh = self.k_proj(k).reshape(b, nk, n, -1)  # (B, Nk, heads, d)
    kh = kh * (1.0 / jnp.sqrt(jnp.float32(kh.shape[-1]))).astype(self.dtype)
    wqk = jnp.einsum('chd,bkhd->bchk', wq, kh)  # (B, C, heads, Nk)
    bqk = jnp.einsum('hd,bkhd->bhk', bq, kh)  # (B, heads, Nk)
    logits = jnp.matmul(q.astype(self.dtype), wqk.reshape(b, c, n * nk))
    logits = logits.reshape(b, nq, n, nk).astype(jnp.float32) + bqk[:, None].astype(jnp.float32)
    if key_mask is not None:
      logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)  # (B, Nq, heads, Nk)
    wo = self.out_proj.kernel[...].astype(self.dtype)
    vo = jnp.einsum('bkhd,hdc->bhkc', self.v_proj(v).reshape(b, nk, n, -1),
                    wo.reshape(n, -1, wo.shape[-1]))  # (B, heads, Nk, C): v_proj, then out_proj
    out = jnp.matmul(attn.reshape(b, nq, n * nk), vo.reshape(b, n * nk, -1))
    return out + self.out_proj.bias[...].astype(self.dtype)

  def _few_queries(self, q, k, v, key_mask):
    """Few queries, many keys (tokens -> image): k_proj folded into the queries (its bias adds
    the same to every key's logit, which the softmax drops), v_proj after the attention (its
    rows sum to 1, so the bias passes through)."""
    b, nq, c = q.shape
    n = self.num_heads
    qh = self.q_proj(q).reshape(b, nq, n, -1)  # (B, Nq, heads, d)
    qh = qh * (1.0 / jnp.sqrt(jnp.float32(qh.shape[-1]))).astype(self.dtype)
    qk = jnp.einsum('bqhd,chd->bqhc', qh, self._heads(self.k_proj)[0])  # (B, Nq, heads, C)
    logits = jnp.matmul(qk.reshape(b, nq * n, c), k.astype(self.dtype).swapaxes(1, 2))
    logits = logits.astype(jnp.float32)  # (B, Nq * heads, Nk)
    if key_mask is not None:
      logits = jnp.where(key_mask[:, None, :], logits, -jnp.inf)
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    av = jnp.matmul(attn, v.astype(self.dtype)).reshape(b, nq, n, -1)  # (B, Nq, heads, C)
    wv, bv = self._heads(self.v_proj)
    out = jnp.einsum('bqhc,chd->bqhd', av, wv) + bv  # (B, Nq, heads, d)
    return self.out_proj(out.reshape(b, nq, -1))


class TwoWayAttentionBlock(nnx.Module):
  """Self-attention of the tokens, then cross-attention both ways (tokens -> image, image -> tokens)."""

  def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int,
               skip_first_layer_pe: bool, *, dtype, rngs):
    self.self_attn = Attention(dim, num_heads, dtype=dtype, rngs=rngs)
    self.norm1 = LayerNorm(dim, eps=1e-5, dtype=dtype)
    self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate, dtype=dtype,
                                               rngs=rngs)
    self.norm2 = LayerNorm(dim, eps=1e-5, dtype=dtype)
    self.mlp = MLPBlock(dim, mlp_dim, act='relu', dtype=dtype, rngs=rngs)
    self.norm3 = LayerNorm(dim, eps=1e-5, dtype=dtype)
    self.norm4 = LayerNorm(dim, eps=1e-5, dtype=dtype)
    self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate, dtype=dtype,
                                               rngs=rngs)
    self.skip_first_layer_pe = skip_first_layer_pe

  def __call__(self, queries, keys, query_pe, key_pe, token_mask, drop=None):
    if self.skip_first_layer_pe:
      queries = dropout(self.self_attn(queries, queries, queries, token_mask), drop, 0)
    else:
      q = queries + query_pe
      queries = queries + dropout(self.self_attn(q, q, queries, token_mask), drop, 0)
    queries = self.norm1(queries)
    q = queries + query_pe
    k = keys + key_pe
    queries = self.norm2(queries + dropout(self.cross_attn_token_to_image(q, k, keys), drop, 1))
    queries = self.norm3(queries + dropout(self.mlp(queries), drop, 2))
    q = queries + query_pe
    k = keys + key_pe
    keys = self.norm4(keys + dropout(self.cross_attn_image_to_token(k, q, queries, token_mask),
                                     drop, 3))
    return queries, keys


class TwoWayTransformer(nnx.Module):
  """``depth`` two-way blocks and a last token -> image attention (official ``TwoWayTransformer``)."""

  def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int,
               attention_downsample_rate: int = 2, *, dtype, rngs):
    self.layers = nnx.List([
        TwoWayAttentionBlock(dim, num_heads, mlp_dim, attention_downsample_rate, i == 0,
                             dtype=dtype, rngs=rngs) for i in range(depth)
    ])
    self.final_attn_token_to_image = Attention(dim, num_heads, attention_downsample_rate,
                                               dtype=dtype, rngs=rngs)
    self.norm_final_attn = LayerNorm(dim, eps=1e-5, dtype=dtype)

  def __call__(self, image_embedding, image_pe, point_embedding, token_mask=None, drop=None):
    """image_embedding / image_pe (B, H, W, C), point_embedding (B, N, C), token_mask (B, N);
    drop: (key, rate) for dropout on every residual branch in training, None at inference.

    Returns the processed tokens (B, N, C) and image keys (B, H * W, C).
    """
    b, h, w, c = image_embedding.shape
    keys = image_embedding.reshape(b, h * w, c)
    key_pe = jnp.broadcast_to(image_pe, image_embedding.shape).reshape(b, h * w, c)
    queries = point_embedding
    for i, layer in enumerate(self.layers):
      layer_drop = None if drop is None else (jax.random.fold_in(drop[0], i), drop[1])
      queries, keys = layer(queries, keys, point_embedding, key_pe, token_mask, layer_drop)
    q = queries + point_embedding
    k = keys + key_pe
    queries = self.norm_final_attn(
        queries + dropout(self.final_attn_token_to_image(q, k, keys), drop, len(self.layers) + 4))
    return queries, keys
