"""The official PyTorch state dict <-> our parameters: a name map plus one transform per kind.

Our attribute names mirror the official ones, so a torch key maps to our path by (1) ``blocks.{i}``
becoming a slot of the stacked ``window_blocks`` (g, j) or ``global_blocks`` (g), (2) ``weight``
becoming ``kernel`` (Linear, Conv) or ``scale`` (LayerNorm), and (3) a transpose of kernels.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np
from flax import nnx

from sam_jax.modeling.config import SamConfig, VARIANTS, variant_name

CONV_TRANSPOSE_PREFIX = 'mask_decoder.output_upscaling.'


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model: names the missing, unexpected and misshapen tensors."""


def _to_torch(key: str, leaf: str, ours: tuple[int, ...]) -> tuple[str, tuple[int, ...], tuple]:
  """(torch key, torch shape, axes permutation that turns the torch array into ours)."""
  if leaf == 'scale':
    return key + 'weight', ours, ()
  if leaf != 'kernel':
    return key + leaf, ours, ()
  if len(ours) == 2:  # Linear (in, out) <- (out, in)
    perm = (1, 0)
  elif key.startswith(CONV_TRANSPOSE_PREFIX):  # (kh, kw, in, out) <- (in, out, kh, kw)
    perm = (2, 3, 0, 1)
  else:  # Conv (kh, kw, in, out) <- (out, in, kh, kw)
    perm = (2, 3, 1, 0)
  inverse = tuple(int(i) for i in np.argsort(perm))
  return key + 'weight', tuple(ours[i] for i in inverse), perm


def layout(cfg: SamConfig, abstract_state: nnx.State) -> dict[str, tuple[tuple, tuple, tuple, tuple]]:
  """torch key -> (our path, stack index, torch shape, permutation torch -> ours)."""
  _, per = cfg.block_groups
  out = {}
  for path, var in nnx.to_flat_state(abstract_state):
    shape = tuple(var.shape if hasattr(var, 'shape') else var[...].shape)
    *parents, leaf = [str(p) for p in path]
    stacks: Iterator[tuple[str, tuple]]
    if parents[:2] == ['image_encoder', 'window_blocks']:
      g, w = shape[:2]
      stacks = ((f'image_encoder.blocks.{a * per + b}.', (a, b)) for a in range(g) for b in range(w))
      rest, shape = parents[2:], shape[2:]
    elif parents[:2] == ['image_encoder', 'global_blocks']:
      stacks = ((f'image_encoder.blocks.{a * per + per - 1}.', (a,)) for a in range(shape[0]))
      rest, shape = parents[2:], shape[1:]
    else:
      stacks, rest = iter([('', ())]), parents
    for prefix, index in stacks:
      key = prefix + ''.join(p + '.' for p in rest)
      key, torch_shape, perm = _to_torch(key, leaf, shape)
      out[key] = (path, index, torch_shape, perm)
  return out


def describe(sd: Mapping[str, np.ndarray]) -> str:
  """Names the official variant a state dict looks like, for error messages."""
  pos = sd.get('image_encoder.pos_embed')
  depth = len({k.split('.')[2] for k in sd if k.startswith('image_encoder.blocks.')})
  if pos is None:
    return 'not a SAM image encoder (no image_encoder.pos_embed)'
  dim = pos.shape[-1]
  for name, v in VARIANTS.items():
    if name != 'default' and v.encoder_embed_dim == dim and v.encoder_depth == depth:
      return f'{name} (embed_dim {dim}, depth {depth})'
  return f'embed_dim {dim}, depth {depth}'


def check_and_convert(sd: Mapping[str, np.ndarray], cfg: SamConfig,
                      abstract_state: nnx.State) -> dict:
  """Validates an official-format state dict against the model and returns our flat {path: array}.

  Raises CheckpointError listing every missing, unexpected or wrongly shaped tensor.
  """
  table = layout(cfg, abstract_state)
  missing = sorted(set(table) - set(sd))
  unexpected = sorted(set(sd) - set(table))
  wrong = sorted(f'{k}: checkpoint {tuple(sd[k].shape)}, model {table[k][2]}' for k in table
                 if k in sd and tuple(sd[k].shape) != table[k][2])
  if missing or unexpected or wrong:
    model_name = variant_name(cfg) or 'custom'
    lines = [f'checkpoint does not fit the {model_name} model; the checkpoint looks like '
             f'{describe(sd)}.']
    for title, items in (('missing', missing), ('unexpected', unexpected), ('wrong shape', wrong)):
      if items:
        shown = ', '.join(items[:20]) + (f', ... ({len(items)} in all)' if len(items) > 20 else '')
        lines.append(f'{title} tensors: {shown}')
    raise CheckpointError('\n'.join(lines))
  flat = {}
  abstract = dict(nnx.to_flat_state(abstract_state))
  for key, (path, index, _, perm) in table.items():
    value = np.asarray(sd[key], np.float32)
    if perm:
      value = value.transpose(perm)
    if not index:
      flat[path] = value
      continue
    if path not in flat:
      flat[path] = np.empty(abstract[path].shape, np.float32)
    flat[path][index] = value
  return flat


def to_official(state: nnx.State, cfg: SamConfig) -> dict[str, np.ndarray]:
  """Our parameters -> an official-format state dict of numpy arrays (the inverse map)."""
  flat = {path: np.asarray(var[...]) for path, var in nnx.to_flat_state(state)}
  out = {}
  for key, (path, index, _, perm) in layout(cfg, state).items():
    value = flat[path][index] if index else flat[path]
    out[key] = value.transpose(np.argsort(perm)) if perm else value
  return out
