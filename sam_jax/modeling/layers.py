"""Small building blocks shared by the SAM modules (NHWC layout, PyTorch-compatible numerics).

Parameters are float32 and carry logical axis names (metadata ``out_sharding``); computation runs in
``dtype`` (float32 or bfloat16); LayerNorm and softmax always run in float32. ``precision`` (None,
'high', 'highest') is passed to the matmuls and convolutions (None: jax's default, TF32 for float32
on recent NVIDIA GPUs).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def param(rngs: nnx.Rngs | None, init: Callable, shape: Sequence[int], axes: Axes) -> nnx.Param:
  """A float32 parameter with logical axis names; ``rngs=None`` for constant initialisers."""
  key = rngs.params() if rngs is not None else None
  value = init(key, tuple(shape), jnp.float32)
  return nnx.Param(value, eager_sharding=False, out_sharding=tuple(axes))


def precision_context(precision: str | None):
  """``jax.default_matmul_precision(precision)``, or nothing for None (jax's default).

  The setting is read when an op is traced and is part of jit's cache key and trace context, so it
  reaches every matmul and conv traced inside, nested jits and scans included.
  """
  return jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()


def with_precision(method: Callable) -> Callable:
  """Traces ``method`` under ``precision_context(self.precision)``: for modules whose matmuls are
  not all given ``precision=`` (the prompt encoder and the mask decoder)."""
  @functools.wraps(method)
  def traced(self, *args, **kwargs):
    with precision_context(self.precision):
      return method(self, *args, **kwargs)
  return traced


def uniform(bound: float) -> Callable:
  """PyTorch's default Linear / Conv initialisation: U(-bound, bound)."""
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def zeros(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


def ones(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def normal(key, shape, dtype):
  return jax.random.normal(key, shape, dtype)


class Buffer(nnx.Variable):
  """A saved, non-trainable array (PyTorch's ``register_buffer``)."""


class Linear(nnx.Module):
  """y = x @ kernel + bias; kernel is (in, out), the transpose of torch's weight."""

  def __init__(self, din: int, dout: int, *, axes: Axes, bias: bool = True, dtype=jnp.float32,
               precision: str | None = None, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(din)
    self.kernel = param(rngs, uniform(bound), (din, dout), axes)
    self.bias = param(rngs, uniform(bound), (dout,), axes[1:]) if bias else None
    self.dtype = dtype
    self.precision = precision

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                   precision=self.precision)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, in float32 (also serves as SAM's LayerNorm2d in NHWC)."""

  def __init__(self, dim: int, *, eps: float, axis_name: str | None = 'embed', dtype=jnp.float32):
    self.scale = param(None, ones, (dim,), (axis_name,))
    self.bias = param(None, zeros, (dim,), (axis_name,))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(self.dtype)


class Conv2d(nnx.Module):
  """2-D convolution on NHWC; kernel (kh, kw, in, out), torch weight transposed (2, 3, 1, 0)."""

  def __init__(self, din: int, dout: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
               bias: bool = True, axes: Axes = (None, None, None, 'embed'), dtype=jnp.float32,
               precision: str | None = None, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(din * kernel_size * kernel_size)
    self.kernel = param(rngs, uniform(bound), (kernel_size, kernel_size, din, dout), axes)
    self.bias = param(rngs, uniform(bound), (dout,), axes[-1:]) if bias else None
    self.stride = stride
    self.padding = padding
    self.dtype = dtype
    self.precision = precision

  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
    k, p = kernel.shape[0], self.padding
    if self.stride == k <= 2 and not p:
      # 1x1 and 2x2-stride-2 convolutions (the neck's first, the mask downscaling) as a matmul,
      # the same sums: XLA:CPU computes their weight gradients over a 16x16 map slowly
      # (configs/tiny.py's train step: 0.93x the time). Not the 16x16 patch embedding: its
      # patchify transpose costs more than the convolution.
      n, h, w, c = x.shape
      x = x[:, :h - h % k, :w - w % k].reshape(n, h // k, k, w // k, k, c)  # (N, H/k, k, W/k, k, C)
      y = jnp.einsum('nhpwqc,pqco->nhwo', x, kernel, precision=self.precision)
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=(self.stride, self.stride), padding=((p, p), (p, p)),
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=self.precision)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class ConvTranspose2x2(nnx.Module):
  """ConvTranspose2d(kernel_size=2, stride=2) on NHWC: every input pixel becomes a 2x2 block.

  Returns the blocks un-interleaved, (..., in) -> (..., 2, 2, out): output pixel (2h + p, 2w + q)
  is [h, w, p, q]. kernel is (2, 2, in, out): torch's (in, out, kh, kw) weight transposed (2, 3, 0, 1).
  """

  def __init__(self, din: int, dout: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(dout * 4)  # torch fans in over weight.size(1) * kh * kw
    self.kernel = param(rngs, uniform(bound), (2, 2, din, dout), (None, None, None, 'embed'))
    self.bias = param(rngs, uniform(bound), (dout,), ('embed',))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.einsum('...i,pqio->...pqo', x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    return y + self.bias[...].astype(self.dtype)


class Embedding(nnx.Module):
  """A learned table, torch's nn.Embedding(num, dim).weight, used whole (never indexed by ids)."""

  def __init__(self, num: int, dim: int, *, rngs: nnx.Rngs):
    self.weight = param(rngs, normal, (num, dim), (None, 'embed'))


class Activation(nnx.Module):
  """A parameter-free activation, so nnx.List indices match torch's nn.Sequential indices."""

  def __init__(self, name: str):
    self.name = name

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.name == 'gelu':
      return jax.nn.gelu(x, approximate=False)
    if self.name == 'relu':
      return jax.nn.relu(x)
    raise ValueError(f'unknown activation {self.name!r}')


def run_sequential(layers: nnx.List, x: jax.Array) -> jax.Array:
  for layer in layers:
    x = layer(x)
  return x


class MLPBlock(nnx.Module):
  """lin1 -> activation -> lin2 (official ``common.MLPBlock``)."""

  def __init__(self, dim: int, mlp_dim: int, *, act: str, dtype=jnp.float32,
               precision: str | None = None, rngs: nnx.Rngs):
    self.lin1 = Linear(dim, mlp_dim, axes=('embed', 'mlp'), dtype=dtype, precision=precision,
                       rngs=rngs)
    self.lin2 = Linear(mlp_dim, dim, axes=('mlp', 'embed'), dtype=dtype, precision=precision,
                       rngs=rngs)
    self.act = Activation(act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.lin2(self.act(self.lin1(x)))


def stacked(make: Callable[[nnx.Rngs], nnx.Module], shape: tuple[int, ...], rngs: nnx.Rngs,
            axis_names: tuple[str, ...] = ('layers',)) -> nnx.Module:
  """Creates prod(shape) independent copies of ``make`` as one module with stacked parameters.

  Every parameter gets leading axes ``shape`` (logical names ``axis_names``); run it with
  ``jax.lax.scan`` over ``nnx.split`` of it. Used for the ViT's repeated blocks, so that compile time
  does not grow with depth.
  """
  assert len(axis_names) == len(shape), (axis_names, shape)
  n = math.prod(shape)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
  keys = jax.random.split(rngs.params(), n)
  state = jax.vmap(lambda key: nnx.split(make(nnx.Rngs(key)))[1])(keys)
  state = jax.tree.map(lambda a: a.reshape(shape + a.shape[1:]), state)
  module = nnx.merge(graphdef, state)
  for _, var in nnx.iter_graph(module):
    if isinstance(var, nnx.Variable):
      axes = var.get_metadata().get('out_sharding') or (None,) * (var[...].ndim - len(shape))
      var.set_metadata(out_sharding=tuple(axis_names) + tuple(axes))
  return module
