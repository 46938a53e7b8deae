"""The image encoder's attention over an (H, W) token grid with decomposed relative positions.

For query token (qy, qx) and key token (ky, kx) the official model's logits are

  scale * q.k + rel_h[q, ky] + rel_w[q, kx],   rel_h[q, ky] = q . Rh[qy, ky],
                                               rel_w[q, kx] = q . Rw[qx, kx]

(Rh, Rw: the gathered relative-position tables, rel terms from the unscaled q). Three forms compute
the same softmax(logits) v; every function takes q, k, v as (B, HW, heads, d) (``jax.nn``'s BTNH
layout), the gathered tables Rh (H, H, d) and Rw (W, W, d), and returns (B, HW, heads, d):

  chunked  logits built a few query rows at a time, so a chunk stays in a CPU's cache: the CPU path,
           parity with the official model to float rounding (1.7x faster than whole logits on
           CPU for vit_b).
  folded   the relative terms folded into q and k, q' = [scale q, rel_h, rel_w], k' = [k, one-hot of
           ky, one-hot of kx], so q'.k' is the logits above and a fused (flash) kernel runs with no
           (heads, HW, HW) bias; head dim d + H + W, zero-padded to a multiple of 8 (vit_h global:
           80 + 64 + 64 = 208; windows of 14: 108 -> 112), v zero-padded to match.
  bias     ``jax.nn.dot_product_attention`` with the (B, heads, HW, HW) bias materialised.

'folded' and 'bias' call ``jax.nn.dot_product_attention`` with implementation 'cudnn' when cuDNN's
fused kernel takes the inputs (CUDA GPU, bf16 / f16, head dim a multiple of 8 and at most 256 on
Hopper or later, 128 before; for 'bias' an even token count), else 'xla' (said once in a warning on
a GPU): a shape cuDNN does not take never reaches it.

``choose`` picks the form for a model's ``attention`` setting when the block is traced, from
``jax.default_backend()`` (inside ``jit`` the inputs are tracers with no devices to ask): a program
placed on a backend other than the default (``jax.jit(..., device=...)``, ``jax.export`` or an
ahead-of-time compile for another platform) should name its form explicitly.
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.modeling.layers import precision_context

# 'auto': chunked on CPU; folded with cuDNN on a CUDA GPU when bf16 / f16 and cuDNN takes the head
# dim (else bias with cuDNN, else chunked: f32 runs chunked, the path measured at 3x the official
# f32 speed on an H100); chunked on TPU and other backends: compiled ahead of time for a v5p chip
# (bench/encoder_tpu_compile.py, vit_h fwd + bwd, bf16, batch 2, remat block), folded through XLA
# needs 1.07x the chunked form's temporaries and 1.71x its FLOPs (the wider head), bias 1.76x and
# 1.29x; a Pallas flash kernel for the folded form is not written. The GPU choice of folded over
# bias is from a probe (DESIGN.md: vit_h global attention, batch 4, bf16, fwd 2.0 vs 3.6 ms, fwd +
# bwd 10.7 vs 13.5 ms), not yet from a whole-encoder measurement: bench/encoder_gpu.py compares all.
# '<form>_xla' forces XLA's implementation of jax.nn.dot_product_attention (tests, benches).
IMPLEMENTATIONS = ('auto', 'chunked', 'folded', 'folded_xla', 'bias', 'bias_xla')

# Global attention over 64x64 tokens has (heads, 4096, 4096) logits: 0.8 GB per image for vit_b.
# Queries are processed a few token rows at a time so that a chunk's logits (at most this many
# float32s, ~26 MB) stay in a server CPU's last-level cache: vit_b's global block runs 1.7x faster
# on CPU than with unchunked logits, and peak memory drops by ~1.5 GB. Measured in
# bench/encoder_cpu.py.
ATTENTION_CHUNK_ELEMENTS = 6_500_000


def relative_index(size: int) -> jax.Array:
  """(size, size) indices into a (2 * size - 1, head_dim) table: q - k + size - 1."""
  coords = jnp.arange(size)
  return coords[:, None] - coords[None, :] + size - 1


def query_rows_per_chunk(b: int, n: int, h: int, w: int) -> int:
  """The largest divisor of h whose (b, n, rows * w, h * w) logits fit ATTENTION_CHUNK_ELEMENTS.

  A symbolic batch (jax.export with a batch dimension left open) is planned as one image.
  """
  b = b if isinstance(b, int) else 1
  fit = max(1, ATTENTION_CHUNK_ELEMENTS // (b * n * w * h * w))
  return max(r for r in range(1, h + 1) if h % r == 0 and r <= fit)


def folded_head_dim(d: int, grid: tuple[int, int]) -> int:
  """Head dim of the folded q' and k': d + H + W rounded up to a multiple of 8."""
  size = d + grid[0] + grid[1]
  return size + -size % 8


# --- choosing a form -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def cuda_capability() -> tuple[int, int] | None:
  """The default device's CUDA compute capability, or None off CUDA GPUs."""
  device = jax.devices()[0]
  if device.platform != 'gpu' or 'cuda' not in device.client.platform_version.lower():
    return None
  return tuple(int(v) for v in device.compute_capability.split('.')[:2])


def cudnn_refusal(form: str, dtype, d: int, grid: tuple[int, int]) -> str | None:
  """Why cuDNN's fused attention would not take this block (None: it would).

  The limits of jax's ``check_is_flash_attention`` (jax 0.10): bf16 / f16, head dim a multiple of
  8 and <= 256 on Hopper and later (128 before), and with a bias an even token count for training.
  """
  capability = cuda_capability()
  if capability is None:
    return 'not a CUDA GPU'
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f'cuDNN fused attention takes bf16 / f16, not {jnp.dtype(dtype).name}'
  head_dim = folded_head_dim(d, grid) if form == 'folded' else d
  limit = 256 if capability >= (9, 0) else 128
  if head_dim > limit or head_dim % 8:
    return f'head dim {head_dim} (a multiple of 8 <= {limit} on sm_{capability[0]}{capability[1]})'
  if form == 'bias' and grid[0] * grid[1] % 2:
    return f'{grid[0] * grid[1]} tokens: cuDNN takes a bias with an even token count only'
  return None


@functools.lru_cache(maxsize=None)
def _warn_fallback(form: str, reason: str) -> None:
  warnings.warn(f"attention '{form}': cuDNN refuses this block ({reason}); using XLA's "
                'implementation instead', stacklevel=3)


def choose(name: str, *, dtype, d: int, grid: tuple[int, int],
           platform: str | None = None) -> tuple[str, str | None]:
  """(form, jax.nn.dot_product_attention implementation or None) for one block's shapes."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'unknown attention {name!r}; choose one of {IMPLEMENTATIONS}')
  platform = platform or jax.default_backend()
  if name == 'auto':
    if platform == 'cpu':
      return 'chunked', None
    if platform == 'gpu':
      for form in ('folded', 'bias'):
        if cudnn_refusal(form, dtype, d, grid) is None:
          return form, 'cudnn'
      return 'chunked', None
    return 'chunked', None
  form, _, forced = name.partition('_')
  if form == 'chunked' or forced == 'xla':
    return form, None if form == 'chunked' else 'xla'
  reason = cudnn_refusal(form, dtype, d, grid) if platform == 'gpu' else 'not a GPU'
  if reason is None:
    return form, 'cudnn'
  if platform == 'gpu':
    _warn_fallback(form, reason)
  return form, 'xla'


def ahead_of_time(platform: str) -> str:
  """The form 'auto' stands for on ``platform``, named explicitly: for a program compiled ahead of
  time for a backend other than the default one (e.g. a TPU slice from a CPU host)."""
  return 'folded' if platform == 'gpu' else 'chunked'


def attend(name: str, q, k, v, rel_h_table, rel_w_table, grid: tuple[int, int], scale: float, *,
           precision: str | None = None) -> jax.Array:
  """The ``name`` form (see ``IMPLEMENTATIONS``) of attention; (B, HW, heads, d) in and out."""
  form, implementation = choose(name, dtype=q.dtype, d=q.shape[-1], grid=grid)
  if form == 'chunked':
    return chunked(q, k, v, rel_h_table, rel_w_table, grid, scale, precision=precision)
  fn = folded if form == 'folded' else bias
  return fn(q, k, v, rel_h_table, rel_w_table, grid, scale, implementation=implementation,
            precision=precision)


# --- the three forms -------------------------------------------------------------------------


def chunked(q, k, v, rel_h_table, rel_w_table, grid: tuple[int, int], scale: float, *,
            precision: str | None = None) -> jax.Array:
  """Logits and softmax a few query rows at a time (``query_rows_per_chunk``), in q's dtype with
  the softmax in float32, as the official model."""
  b, _, n, d = q.shape
  h, w = grid
  dtype, f32 = q.dtype, jnp.float32
  q, v = (t.transpose(0, 2, 1, 3) for t in (q, v))  # (B, heads, HW, d)
  k_t = k.transpose(0, 2, 3, 1)  # (B, heads, d, HW), once for every chunk
  r_q = q.reshape(b, n, h, w, d)
  # (B, heads, H, W, kH) and (B, heads, H, W, kW), from the unscaled q as the official model
  rel_h = jnp.einsum('bnyxd,yid->bnyxi', r_q, rel_h_table, precision=precision)
  rel_w = jnp.einsum('bnyxd,xjd->bnyxj', r_q, rel_w_table, precision=precision)

  def attend_rows(q, rel_h, rel_w):  # a chunk of r query rows: q (B, heads, r * W, d)
    r = rel_h.shape[2]
    # The relative terms are summed first, then added to the logits as one (rW, HW) bias (XLA's
    # CPU kernel adds that far faster than two 6-D broadcasts: vit_b's windowed blocks 0.6x the
    # time), and the softmax's division is applied to the (rW, d) output instead of the (rW, HW)
    # probabilities: both only reorder the official's rounding.
    bias = rel_h[..., :, None].astype(f32) + rel_w[..., None, :].astype(f32)  # (B, heads, r, W, H, W)
    logits = jnp.matmul(q * scale, k_t, precision=precision)  # (B, heads, rW, HW)
    logits = logits.astype(f32) + bias.reshape(b, n, r * w, h * w)
    shift = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))  # cancels in the ratio
    e = jnp.exp(logits - shift)
    out = jnp.matmul(e.astype(dtype), v, precision=precision)  # (B, heads, rW, d)
    return (out.astype(f32) / e.sum(axis=-1, keepdims=True)).astype(dtype)

  rows = query_rows_per_chunk(b, n, h, w)
  if rows == h:
    out = attend_rows(q, rel_h, rel_w)
  else:  # chunk axis first: q (h/rows, B, heads, rows * W, d), rel (h/rows, B, heads, rows, W, k)
    chunks = h // rows
    qs = jnp.moveaxis(q.reshape(b, n, chunks, rows * w, d), 2, 0)
    rhs = jnp.moveaxis(rel_h.reshape(b, n, chunks, rows, w, h), 2, 0)
    rws = jnp.moveaxis(rel_w.reshape(b, n, chunks, rows, w, w), 2, 0)
    out = jax.lax.map(lambda xs: attend_rows(*xs), (qs, rhs, rws))  # (chunks, B, heads, rW, d)
    out = jnp.moveaxis(out, 0, 2).reshape(b, n, h * w, d)
  return out.transpose(0, 2, 1, 3)  # (B, HW, heads, d)


def rel_terms(q, rel_h_table, rel_w_table, grid: tuple[int, int], precision=None):
  """rel_h (B, H, W, heads, kH) and rel_w (B, H, W, heads, kW) from the unscaled q."""
  b, _, n, d = q.shape
  r_q = q.reshape(b, grid[0], grid[1], n, d)  # (B, H, W, heads, d)
  rel_h = jnp.einsum('byxnd,yid->byxni', r_q, rel_h_table, precision=precision)
  rel_w = jnp.einsum('byxnd,xjd->byxnj', r_q, rel_w_table, precision=precision)
  return rel_h, rel_w


def folded(q, k, v, rel_h_table, rel_w_table, grid: tuple[int, int], scale: float, *,
           implementation: str = 'xla', precision: str | None = None) -> jax.Array:
  """Relative positions folded into q' and k' (module docstring); one fused attention, no bias."""
  b, hw, n, d = q.shape
  h, w = grid
  pad = folded_head_dim(d, grid) - (d + h + w)
  rel_h, rel_w = rel_terms(q, rel_h_table, rel_w_table, grid, precision)
  zeros = jnp.zeros((b, hw, n, pad), q.dtype)
  q_fold = jnp.concatenate([q * scale, rel_h.reshape(b, hw, n, h), rel_w.reshape(b, hw, n, w),
                            zeros], -1)  # (B, HW, heads, d + H + W + pad)
  key_y, key_x = np.divmod(np.arange(hw), w)  # key token t = ky * W + kx
  select = np.concatenate([np.eye(h)[key_y], np.eye(w)[key_x], np.zeros((hw, pad))], -1)
  select = jnp.broadcast_to(jnp.asarray(select, k.dtype)[:, None], (b, hw, n, h + w + pad))
  k_fold = jnp.concatenate([k, select], -1)  # (B, HW, heads, d + H + W + pad)
  v_fold = jnp.concatenate([v, jnp.zeros((b, hw, n, h + w + pad), v.dtype)], -1)
  # jax.nn.dot_product_attention takes no precision=: the context reaches its XLA form's
  # einsums (cuDNN's kernel ignores it)
  with precision_context(precision):
    out = jax.nn.dot_product_attention(q_fold, k_fold, v_fold, scale=1.0,
                                       implementation=implementation)
  return out[..., :d]


def bias(q, k, v, rel_h_table, rel_w_table, grid: tuple[int, int], scale: float, *,
         implementation: str = 'xla', precision: str | None = None) -> jax.Array:
  """``jax.nn.dot_product_attention`` with the (B, heads, HW, HW) relative-position bias."""
  b, hw, n, _ = q.shape
  rel_h, rel_w = rel_terms(q, rel_h_table, rel_w_table, grid, precision)
  rel = rel_h[..., :, None] + rel_w[..., None, :]  # (B, H, W, heads, kH, kW)
  rel = rel.reshape(b, hw, n, hw).transpose(0, 2, 1, 3)  # (B, heads, HW, HW)
  with precision_context(precision):  # as in folded
    return jax.nn.dot_product_attention(q, k, v, rel, scale=scale, implementation=implementation)
