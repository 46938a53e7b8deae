"""Hugging Face ``transformers`` SAM checkpoints -> the official state-dict format, without torch.

``SamModel.save_pretrained`` writes ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). We read it with ``safetensors.numpy`` and rename every tensor to
the key the official ``segment_anything`` model uses, so ``official.check_and_convert`` can take it
from there.

The map is a pure renaming: HF stores every tensor with the official shape and layout. In particular
the random-Fourier positional matrix ``shared_image_embedding.positional_embedding`` (2, C/2) is the
official ``pe_layer.positional_encoding_gaussian_matrix`` as is (neither scaled nor transposed: both
compute ``(2 * coords - 1) @ M``). The notable renames are

* ``nn.Sequential`` indices that HF names: ``neck.{conv1, layer_norm1, conv2, layer_norm2}`` ->
  ``neck.{0, 1, 2, 3}``, ``mask_embed.{conv1, layer_norm1, conv2, layer_norm2, conv3}`` ->
  ``mask_downscaling.{0, 1, 3, 4, 6}``, ``upscale_{conv1, layer_norm, conv2}`` ->
  ``output_upscaling.{0, 1, 3}`` (the GELUs take the missing indices);
* the MLP heads: ``proj_in`` -> ``layers.0``, ``layers.{k}`` -> ``layers.{k+1}``, ``proj_out`` ->
  ``layers.{depth-1}``;
* ``layer_norm{k}`` -> ``norm{k}``, ``layers.{i}`` -> ``blocks.{i}`` (image encoder),
  ``point_embed.{i}`` -> ``point_embeddings.{i}``,
  ``patch_embed.projection`` -> ``patch_embed.proj``.

HF ties ``prompt_encoder.shared_embedding.positional_embedding`` to
``shared_image_embedding.positional_embedding``; ``save_pretrained`` writes only the latter, other
writers may store both. The copy is dropped (the official model holds one matrix for both uses).

One behavioural difference is not in the weights: HF's two-way transformer blocks use
``mask_decoder_config.layer_norm_eps`` (1e-6) for ``layer_norm1..4`` where the official
``norm1..4`` are ``nn.LayerNorm`` with eps 1e-5; an imported checkpoint runs with the official eps
(in the test's small random model, masks move by 5e-5..9e-5 of their scale).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import safetensors
import safetensors.numpy

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
INDEX_NAME = 'model.safetensors.index.json'

SHARED_PE = 'shared_image_embedding.positional_embedding'
PROMPT_PE = 'prompt_encoder.shared_embedding.positional_embedding'
OFFICIAL_PE = 'prompt_encoder.pe_layer.positional_encoding_gaussian_matrix'

# Prefixes only a transformers SAM state dict has (the official one starts every key with
# image_encoder. / prompt_encoder. / mask_decoder. and never uses these sub-module names).
_HF_MARKERS = ('vision_encoder.', 'shared_image_embedding.', 'prompt_encoder.shared_embedding.',
               'prompt_encoder.point_embed.', 'prompt_encoder.mask_embed.',
               'mask_decoder.upscale_conv')

def _read_bfloat16(path: Path) -> dict[str, np.ndarray]:
  """A file with bfloat16 tensors, which numpy lacks: read as jax arrays, widened exactly."""
  with safetensors.safe_open(str(path), framework='flax') as f:
    return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}


def _read_file(path: Path) -> dict[str, np.ndarray]:
  """One .safetensors file -> {name: array}; a clear ValueError if it is not one."""
  try:
    return safetensors.numpy.load_file(str(path))
  except TypeError:  # numpy has no bfloat16: "data type 'bfloat16' not understood".
    return _read_bfloat16(path)
  except Exception as e:  # safetensors' own error type for a bad header or a truncated file.
    raise ValueError(f'{path}: not a readable safetensors file ({e})') from e


def _read_index(index: Path) -> dict[str, np.ndarray]:
  """A sharded checkpoint: reads every shard named by the index's weight_map."""
  try:
    weight_map = json.loads(index.read_text())['weight_map']
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{index}: not a safetensors index (no readable "weight_map": {e})') from e
  out = {}
  for shard in sorted(set(weight_map.values())):
    shard_path = index.parent / shard
    if not shard_path.is_file():
      raise FileNotFoundError(f'{index} names shard {shard!r}, but {shard_path} does not exist')
    out.update(_read_file(shard_path))
  absent = sorted(set(weight_map) - set(out))
  if absent:
    raise ValueError(f'{index}: {len(absent)} tensors listed in the index are in none of its '
                     'shards: ' + ', '.join(absent[:10]))
  return out


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a ``.safetensors`` file, a sharded index (``*.safetensors.index.json``), or a directory
  holding ``model.safetensors`` or ``model.safetensors.index.json``, with numpy only (no torch)."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f'no checkpoint at {path}: the path does not exist')
  if path.is_dir():
    if (path / WEIGHTS_NAME).is_file():
      return _read_file(path / WEIGHTS_NAME)
    if (path / INDEX_NAME).is_file():
      return _read_index(path / INDEX_NAME)
    found = sorted(p.name for p in path.iterdir())
    listing = ', '.join(found[:10]) if found else 'the directory is empty'
    raise FileNotFoundError(f'no {WEIGHTS_NAME} or {INDEX_NAME} in {path} ({listing}); only '
                            'safetensors checkpoints are read without PyTorch')
  if path.name.endswith('.json'):
    return _read_index(path)
  return _read_file(path)


# transformers' SamConfig (sub-config, field) -> our SamConfig field. Head counts show in no
# tensor's shape, so only config.json can tell a checkpoint's from the variant's.
CONFIG_FIELDS = (
    ('vision_config', 'hidden_size', 'encoder_embed_dim'),
    ('vision_config', 'num_hidden_layers', 'encoder_depth'),
    ('vision_config', 'num_attention_heads', 'encoder_num_heads'),
    ('vision_config', 'global_attn_indexes', 'encoder_global_attn_indexes'),
    ('vision_config', 'image_size', 'image_size'),
    ('vision_config', 'patch_size', 'patch_size'),
    ('vision_config', 'window_size', 'window_size'),
    ('vision_config', 'mlp_ratio', 'mlp_ratio'),
    ('vision_config', 'output_channels', 'prompt_embed_dim'),
    ('prompt_encoder_config', 'mask_input_channels', 'mask_in_chans'),
    ('mask_decoder_config', 'num_hidden_layers', 'decoder_depth'),
    ('mask_decoder_config', 'num_attention_heads', 'decoder_num_heads'),
    ('mask_decoder_config', 'mlp_dim', 'decoder_mlp_dim'),
    ('mask_decoder_config', 'num_multimask_outputs', 'num_multimask_outputs'),
    ('mask_decoder_config', 'iou_head_depth', 'iou_head_depth'),
    ('mask_decoder_config', 'iou_head_hidden_dim', 'iou_head_hidden_dim'),
)


def config_mismatches(path: str | os.PathLike, cfg) -> list[str]:
  """Where the ``config.json`` beside a safetensors checkpoint (in its directory) describes
  another architecture than ``cfg``: one line per field; [] when it agrees or there is none.
  Fields the file leaves out are not compared."""
  path = Path(path)
  file = (path if path.is_dir() else path.parent) / CONFIG_NAME
  if not file.is_file():
    return []
  try:
    hf_config = json.loads(file.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f'{file}: not a readable JSON config ({e})') from e
  if not isinstance(hf_config, dict):
    return []
  as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # JSON has no tuples
  lines = []
  for sub, field, ours in CONFIG_FIELDS:
    section = hf_config.get(sub)
    value = section.get(field) if isinstance(section, dict) else None
    expected = getattr(cfg, ours)
    if value is not None and as_list(value) != as_list(expected):
      lines.append(f'{sub}.{field} = {value}, the model has {ours} = {expected}')
  return lines


def is_hf_state_dict(tensors: Mapping[str, object]) -> bool:
  """Whether the keys are transformers' SamModel / SamVisionModel names, not official ones."""
  return any(k.startswith(_HF_MARKERS) for k in tensors)


_WB = r'(weight|bias)'
_Rule = tuple[re.Pattern, Callable[[re.Match, Mapping[str, int]], str]]


def _rule(pattern: str, target: str | Callable[[re.Match, Mapping[str, int]], str]) -> _Rule:
  """A full-match pattern and its replacement (a template with \\1-style groups, or a function)."""
  if isinstance(target, str):
    template = target
    target = lambda m, _: m.expand(template)  # noqa: E731
  return re.compile(pattern), target


def _mlp_layer(m: re.Match, depths: Mapping[str, int]) -> str:
  """HF SamFeedForward (proj_in, layers.k, proj_out) -> official MLP layers.{0..depth-1}."""
  head, part, k, leaf = m.group(1), m.group(2), m.group(3), m.group(4)
  if part == 'proj_in':
    index = 0
  elif part == 'proj_out':
    index = depths.get(head, 2) - 1
  else:
    index = int(k) + 1
  return f'mask_decoder.{head}.layers.{index}.{leaf}'


_RULES: tuple[_Rule, ...] = (
    # Image encoder.
    _rule(r'vision_encoder\.pos_embed', 'image_encoder.pos_embed'),
    _rule(rf'vision_encoder\.patch_embed\.projection\.{_WB}', r'image_encoder.patch_embed.proj.\1'),
    _rule(rf'vision_encoder\.layers\.(\d+)\.layer_norm([12])\.{_WB}',
          r'image_encoder.blocks.\1.norm\2.\3'),
    _rule(rf'vision_encoder\.layers\.(\d+)\.attn\.(qkv|proj)\.{_WB}',
          r'image_encoder.blocks.\1.attn.\2.\3'),
    _rule(r'vision_encoder\.layers\.(\d+)\.attn\.(rel_pos_[hw])',
          r'image_encoder.blocks.\1.attn.\2'),
    _rule(rf'vision_encoder\.layers\.(\d+)\.mlp\.(lin[12])\.{_WB}',
          r'image_encoder.blocks.\1.mlp.\2.\3'),
    _rule(r'vision_encoder\.neck\.conv1\.weight', 'image_encoder.neck.0.weight'),
    _rule(rf'vision_encoder\.neck\.layer_norm1\.{_WB}', r'image_encoder.neck.1.\1'),
    _rule(r'vision_encoder\.neck\.conv2\.weight', 'image_encoder.neck.2.weight'),
    _rule(rf'vision_encoder\.neck\.layer_norm2\.{_WB}', r'image_encoder.neck.3.\1'),
    # Prompt encoder.
    _rule(re.escape(SHARED_PE), OFFICIAL_PE),
    _rule(r'prompt_encoder\.point_embed\.(\d+)\.weight',
          r'prompt_encoder.point_embeddings.\1.weight'),
    _rule(r'prompt_encoder\.(not_a_point_embed|no_mask_embed)\.weight',
          r'prompt_encoder.\1.weight'),
    _rule(rf'prompt_encoder\.mask_embed\.conv1\.{_WB}', r'prompt_encoder.mask_downscaling.0.\1'),
    _rule(rf'prompt_encoder\.mask_embed\.layer_norm1\.{_WB}',
          r'prompt_encoder.mask_downscaling.1.\1'),
    _rule(rf'prompt_encoder\.mask_embed\.conv2\.{_WB}', r'prompt_encoder.mask_downscaling.3.\1'),
    _rule(rf'prompt_encoder\.mask_embed\.layer_norm2\.{_WB}',
          r'prompt_encoder.mask_downscaling.4.\1'),
    _rule(rf'prompt_encoder\.mask_embed\.conv3\.{_WB}', r'prompt_encoder.mask_downscaling.6.\1'),
    # Mask decoder.
    _rule(r'mask_decoder\.(iou_token|mask_tokens)\.weight', r'mask_decoder.\1.weight'),
    _rule(rf'mask_decoder\.transformer\.layers\.(\d+)\.'
          rf'(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)\.'
          rf'([qkv]_proj|out_proj)\.{_WB}', r'mask_decoder.transformer.layers.\1.\2.\3.\4'),
    _rule(rf'mask_decoder\.transformer\.layers\.(\d+)\.layer_norm([1-4])\.{_WB}',
          r'mask_decoder.transformer.layers.\1.norm\2.\3'),
    _rule(rf'mask_decoder\.transformer\.layers\.(\d+)\.mlp\.(lin[12])\.{_WB}',
          r'mask_decoder.transformer.layers.\1.mlp.\2.\3'),
    _rule(rf'mask_decoder\.transformer\.final_attn_token_to_image\.([qkv]_proj|out_proj)\.{_WB}',
          r'mask_decoder.transformer.final_attn_token_to_image.\1.\2'),
    _rule(rf'mask_decoder\.transformer\.layer_norm_final_attn\.{_WB}',
          r'mask_decoder.transformer.norm_final_attn.\1'),
    _rule(rf'mask_decoder\.upscale_conv1\.{_WB}', r'mask_decoder.output_upscaling.0.\1'),
    _rule(rf'mask_decoder\.upscale_layer_norm\.{_WB}', r'mask_decoder.output_upscaling.1.\1'),
    _rule(rf'mask_decoder\.upscale_conv2\.{_WB}', r'mask_decoder.output_upscaling.3.\1'),
    _rule(rf'mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.'
          rf'(proj_in|proj_out|layers\.(\d+))\.{_WB}', _mlp_layer),
)

_MLP_HIDDEN = re.compile(r'mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.'
                         r'layers\.(\d+)\.weight')


def _mlp_depths(keys) -> dict[str, int]:
  """Official layer count of each MLP head: HF's hidden ``layers.k`` plus proj_in and proj_out."""
  depths: dict[str, int] = {}
  for key in keys:
    m = _MLP_HIDDEN.fullmatch(key)
    if m:
      depths[m.group(1)] = max(depths.get(m.group(1), 2), int(m.group(2)) + 3)
  return depths


def official_key(key: str, depths: Mapping[str, int] | None = None) -> str | None:
  """The official name of one HF key, or None when no rule knows it. ``depths`` as ``_mlp_depths``
  (needed only for ``proj_out``; a head with no hidden layer has depth 2)."""
  for pattern, target in _RULES:
    m = pattern.fullmatch(key)
    if m:
      return target(m, depths or {})
  return None


def hf_to_official(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames a transformers SAM state dict to official keys; values become float32 numpy arrays.

  Keys no rule knows keep their HF name (the loader reports them as unexpected). The one key dropped
  is ``prompt_encoder.shared_embedding.positional_embedding``, HF's tied copy of
  ``shared_image_embedding.positional_embedding``; it is used only when the latter is absent, and a
  copy that differs from it raises ValueError (the official model cannot hold two matrices).
  """
  depths = _mlp_depths(tensors)
  out: dict[str, np.ndarray] = {}
  for key, value in tensors.items():
    if key == PROMPT_PE:
      continue
    name = official_key(key, depths) or key
    if name in out:
      raise ValueError(f'two checkpoint tensors map to {name!r} (one of them is {key!r})')
    out[name] = np.asarray(value, dtype=np.float32)
  if PROMPT_PE in tensors:
    copy = np.asarray(tensors[PROMPT_PE], dtype=np.float32)
    if SHARED_PE not in tensors:
      out[OFFICIAL_PE] = copy
    elif copy.shape != out[OFFICIAL_PE].shape or not np.array_equal(copy, out[OFFICIAL_PE]):
      raise ValueError(f'{PROMPT_PE} differs from {SHARED_PE}; transformers ties the two and the '
                       'official model has one positional matrix for both')
  return out
