"""SAM's ViTDet-style image encoder: windowed + global attention with decomposed relative positions.

Mirrors the official ``segment_anything.modeling.image_encoder`` (names included), in NHWC. The blocks
are stored stacked, as ``groups`` x (``per_group - 1`` windowed blocks, then 1 global block), and run
with two nested ``lax.scan``s, so compile time does not grow with depth. The official checkpoint's
``blocks.{i}`` are block ``per_group * g + j`` (see ``checkpoints.official``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from sam_jax.modeling.attention import attend, relative_index
from sam_jax.modeling.config import SamConfig
from sam_jax.modeling.layers import (Conv2d, LayerNorm, Linear, MLPBlock, param, run_sequential,
                                     stacked, zeros)


class Attention(nnx.Module):
  """Multi-head attention over an (H, W) grid with decomposed relative position (official names).

  attention: a form of ``modeling.attention.IMPLEMENTATIONS`` ('auto' picks one per backend);
  precision: of the matmuls (None: jax's default).
  """

  def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int], *, dtype, rngs,
               attention: str = 'auto', precision: str | None = None):
    self.num_heads = num_heads
    head_dim = dim // num_heads
    self.scale = head_dim**-0.5
    self.qkv = Linear(dim, 3 * dim, axes=('embed', 'qkv'), dtype=dtype, precision=precision,
                      rngs=rngs)
    self.proj = Linear(dim, dim, axes=('qkv', 'embed'), dtype=dtype, precision=precision, rngs=rngs)
    self.rel_pos_h = param(None, zeros, (2 * input_size[0] - 1, head_dim), (None, 'head_dim'))
    self.rel_pos_w = param(None, zeros, (2 * input_size[1] - 1, head_dim), (None, 'head_dim'))
    self.dtype = dtype
    self.attention = attention
    self.precision = precision

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    n = self.num_heads
    qkv = self.qkv(x).reshape(b, h * w, 3, n, c // n)  # (B, HW, 3, heads, d)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, HW, heads, d)
    rh = self.rel_pos_h[...].astype(self.dtype)[relative_index(h)]  # (H, H, d)
    rw = self.rel_pos_w[...].astype(self.dtype)[relative_index(w)]  # (W, W, d)
    out = attend(self.attention, q, k, v, rh, rw, (h, w), self.scale,
                 precision=self.precision)  # (B, HW, heads, d)
    return self.proj(out.reshape(b, h, w, c))


class Block(nnx.Module):
  """Pre-norm transformer block; window_size > 0 attends within zero-padded windows."""

  def __init__(self, cfg: SamConfig, *, window_size: int, rngs: nnx.Rngs):
    dim, dtype, precision = cfg.encoder_embed_dim, cfg.compute_dtype, cfg.matmul_precision
    input_size = (window_size,) * 2 if window_size else (cfg.grid_size,) * 2
    self.norm1 = LayerNorm(dim, eps=1e-6, dtype=dtype)
    self.attn = Attention(dim, cfg.encoder_num_heads, input_size, dtype=dtype, rngs=rngs,
                          attention=cfg.attention, precision=precision)
    self.norm2 = LayerNorm(dim, eps=1e-6, dtype=dtype)
    self.mlp = MLPBlock(dim, int(dim * cfg.mlp_ratio), act='gelu', dtype=dtype,
                        precision=precision, rngs=rngs)
    self.window_size = window_size

  def __call__(self, x: jax.Array, drop: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """drop: (key, rate) for stochastic depth in training (whole residual branches per image)."""
    shortcut = x
    x = self.norm1(x)
    ws = self.window_size
    if ws:
      b, h, w, _ = x.shape
      ph, pw = -h % ws, -w % ws
      x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
      x = rearrange(x, 'b (nh wh) (nw ww) c -> (b nh nw) wh ww c', wh=ws, ww=ws)
    x = self.attn(x)
    if ws:
      x = rearrange(x, '(b nh nw) wh ww c -> b (nh wh) (nw ww) c', b=b, nh=(h + ph) // ws)
      x = x[:, :h, :w]
    if drop is not None:
      key_attn, key_mlp = jax.random.split(drop[0])
      x = shortcut + drop_path(x, key_attn, drop[1])
      return x + drop_path(self.mlp(self.norm2(x)), key_mlp, drop[1])
    x = shortcut + x
    return x + self.mlp(self.norm2(x))


def drop_path(x: jax.Array, key: jax.Array, rate: jax.Array) -> jax.Array:
  """Stochastic depth: zeroes a residual branch per image with probability ``rate``, else
  scales it by 1 / (1 - rate)."""
  keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate).astype(x.dtype), 0).astype(x.dtype)


# What a remat policy saves of each block's activations for the backward pass (None: everything,
# no recomputation). 'block' saves only the block inputs and recomputes the rest.
REMAT_POLICIES = {
    'none': None,
    'block': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_saveable,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class PatchEmbed(nnx.Module):
  """The 16x16, stride-16 convolution that turns pixels into tokens."""

  def __init__(self, cfg: SamConfig, *, rngs: nnx.Rngs):
    p = cfg.patch_size
    self.proj = Conv2d(3, cfg.encoder_embed_dim, p, stride=p, dtype=cfg.compute_dtype,
                       precision=cfg.matmul_precision, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(x)  # (B, H/16, W/16, C)


class ImageEncoderViT(nnx.Module):
  """(B, S, S, 3) normalised, padded images -> (B, S/16, S/16, prompt_embed_dim) embeddings."""

  def __init__(self, cfg: SamConfig, *, rngs: nnx.Rngs):
    groups, per_group = cfg.block_groups
    dim, out, dtype = cfg.encoder_embed_dim, cfg.prompt_embed_dim, cfg.compute_dtype
    precision = cfg.matmul_precision
    self.patch_embed = PatchEmbed(cfg, rngs=rngs)
    self.pos_embed = param(None, zeros, (1, cfg.grid_size, cfg.grid_size, dim),
                           (None, None, None, 'embed'))
    self.window_blocks = stacked(lambda r: Block(cfg, window_size=cfg.window_size, rngs=r),
                                 (groups, per_group - 1), rngs, ('layers', 'sublayers'))
    self.global_blocks = stacked(lambda r: Block(cfg, window_size=0, rngs=r), (groups,), rngs)
    self.block_groups = (groups, per_group)
    self.neck = nnx.List([
        Conv2d(dim, out, 1, bias=False, axes=(None, None, 'embed', None), dtype=dtype,
               precision=precision, rngs=rngs),
        LayerNorm(out, eps=1e-6, axis_name=None, dtype=dtype),
        Conv2d(out, out, 3, padding=1, bias=False, axes=(None, None, None, None), dtype=dtype,
               precision=precision, rngs=rngs),
        LayerNorm(out, eps=1e-6, axis_name=None, dtype=dtype),
    ])

  def __call__(self, x: jax.Array, *, drop_path_rate: float = 0.0, rng: jax.Array | None = None,
               remat: str = 'none') -> jax.Array:
    """drop_path_rate: stochastic depth of the last block (linear from 0 over depth, as ViTDet),
    drawn from ``rng``; remat: a ``REMAT_POLICIES`` name, applied to every block."""
    x = self.patch_embed(x)
    x = x + self.pos_embed[...].astype(x.dtype)
    window_def, window_params = nnx.split(self.window_blocks)
    global_def, global_params = nnx.split(self.global_blocks)
    groups, per_group = self.block_groups
    if drop_path_rate:
      if rng is None:
        raise ValueError('drop_path_rate > 0 needs an rng key')
      rates = jnp.linspace(0.0, drop_path_rate, groups * per_group).reshape(groups, per_group)
      keys = jax.random.split(rng, (groups, per_group))
      drops = (keys, rates)  # per block: (groups, per_group, ...)
    else:
      drops = None

    if remat not in REMAT_POLICIES:
      raise ValueError(f'unknown remat policy {remat!r}; choose one of {sorted(REMAT_POLICIES)}')

    def block_fn(graphdef):
      def run(params, x, drop):
        return nnx.merge(graphdef, params)(x, drop)
      return run if remat == 'none' else jax.checkpoint(run, policy=REMAT_POLICIES[remat])

    run_window, run_global = block_fn(window_def), block_fn(global_def)

    def window_step(x, xs):
      params, drop = xs
      return run_window(params, x, drop), None

    def group_step(x, xs):
      window_group, global_block, drop = xs
      window_drop = None if drop is None else jax.tree.map(lambda a: a[:-1], drop)
      global_drop = None if drop is None else jax.tree.map(lambda a: a[-1], drop)
      x, _ = jax.lax.scan(window_step, x, (window_group, window_drop))
      return run_global(global_block, x, global_drop), None

    x, _ = jax.lax.scan(group_step, x, (window_params, global_params, drops))
    return run_sequential(self.neck, x)
