"""The optimizer of SAM's recipe from optax: AdamW with layer-wise learning-rate decay over the ViT,
linear warmup then step decay, optional gradient clipping and accumulation.

Parameters are an ``nnx.State`` of the trainable variables (the optimizer state mirrors it, so it
carries the same logical axis names and shards like the parameters).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from sam_jax.modeling.config import SamConfig

# No weight decay on biases, norms, position tables and learned tokens / embeddings: only on the
# kernels of linear and convolution layers.
DECAYED = ('kernel',)


def learning_rate_schedule(base_lr: float, warmup_steps: int, decay_steps: Sequence[int] = (),
                           decay_factor: float = 0.1) -> optax.Schedule:
  """Linear warmup from 0 to ``base_lr`` over ``warmup_steps``, then x ``decay_factor`` at each
  of ``decay_steps`` (absolute step numbers), as the paper's 250 / (60k, 86,666) schedule."""
  steps = {int(s): decay_factor for s in decay_steps}
  decay = optax.piecewise_constant_schedule(base_lr, steps)
  if not warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
  return lambda step: jnp.where(step < warmup_steps, warmup(step), decay(step))


def _path_names(path) -> list[str]:
  """Key path of a leaf of an nnx.State -> its names ('image_encoder', ..., 'kernel')."""
  names = [str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path]
  return names[:-1] if names and names[-1] == 'value' else names  # the Variable's own node


def weight_decay_mask(params: nnx.State) -> nnx.State:
  """True for the parameters that get weight decay (same tree as ``params``)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _path_names(p)[-1] in DECAYED, params)


def layer_ids(params: nnx.State, cfg: SamConfig):
  """The ViT layer of every parameter, as arrays that broadcast over stacked blocks: 0 for the
  patch and position embeddings, i + 1 for block i, depth + 1 for the neck, the prompt encoder
  and the mask decoder (BEiT / MAE numbering)."""
  groups, per_group = cfg.block_groups
  depth = cfg.encoder_depth
  block = np.arange(depth).reshape(groups, per_group) + 1  # (groups, per_group)

  def one(path, x):
    names = _path_names(path)
    if names[0] != 'image_encoder' or names[1] == 'neck':
      layer = np.full((), depth + 1)
    elif names[1] in ('patch_embed', 'pos_embed'):
      layer = np.zeros(())
    elif names[1] == 'window_blocks':  # leading axes (groups, per_group - 1)
      layer = block[:, :-1]
    elif names[1] == 'global_blocks':  # leading axis (groups,)
      layer = block[:, -1]
    else:
      raise ValueError(f'no layer id for parameter {"/".join(names)}')
    return layer.reshape(layer.shape + (1,) * (np.ndim(x) - layer.ndim)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(one, params)


def layer_scales(params: nnx.State, cfg: SamConfig, decay: float):
  """Learning-rate multipliers decay ** (depth + 1 - layer): 1 for the decoder and the neck."""
  return jax.tree.map(lambda i: jnp.asarray(decay ** (cfg.encoder_depth + 1 - i), jnp.float32),
                      layer_ids(params, cfg))


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiplies every update by its entry of ``scales`` (a tree like the parameters)."""
  return optax.stateless(lambda updates, params=None: jax.tree.map(
      lambda u, s: u * s.astype(u.dtype), updates, scales))


def make_optimizer(config: ml_collections.ConfigDict, params: nnx.State, model_cfg: SamConfig
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW from ``config.optimizer`` (see configs/) for ``params``; returns (tx, schedule)."""
  oc = config.optimizer
  schedule = learning_rate_schedule(oc.learning_rate, oc.warmup_steps, tuple(oc.decay_steps),
                                    oc.decay_factor)
  parts = []
  if oc.get('grad_clip_norm'):
    parts.append(optax.clip_by_global_norm(oc.grad_clip_norm))
  parts += [
      optax.scale_by_adam(b1=oc.b1, b2=oc.b2, eps=oc.eps),
      optax.add_decayed_weights(oc.weight_decay, mask=weight_decay_mask(params)),
      optax.scale_by_learning_rate(schedule),
  ]
  if oc.layer_decay != 1.0:
    parts.append(scale_by_tree(layer_scales(params, model_cfg, oc.layer_decay)))
  tx = optax.chain(*parts)
  if oc.get('grad_accum_steps', 1) > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=oc.grad_accum_steps)
  return tx, schedule
