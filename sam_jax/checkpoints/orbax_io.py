"""Our own checkpoint format: an orbax directory of parameters plus the model configuration (written
by ``sam_jax.convert``), or a training workdir (``sam_jax.training.checkpointing``)."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sam_jax.modeling.config import SamConfig, variant_name

CONFIG_FILE = 'sam_config.json'
PARAMS_DIR = 'params'


def is_orbax_checkpoint(path: Path) -> bool:
  return path.is_dir() and (path / CONFIG_FILE).is_file()


def read_config(path: str | Path) -> SamConfig:
  return SamConfig.from_dict(json.loads((Path(path) / CONFIG_FILE).read_text())['model'])


def _str_keys(tree):
  """Orbax stores dict keys as strings; nnx.List children have int keys."""
  if isinstance(tree, dict):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def save(path: str | Path, cfg: SamConfig, state: nnx.State) -> Path:
  """Writes ``state`` (a Sam model's nnx.State) and ``cfg`` to a new directory ``path``."""
  path = Path(path).absolute()
  path.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path / PARAMS_DIR, _str_keys(nnx.to_pure_dict(state)), force=True)
  (path / CONFIG_FILE).write_text(json.dumps({'model': cfg.to_dict(), 'format': 1}, indent=1))
  return path


def load(path: str | Path, cfg: SamConfig, abstract_state: nnx.State) -> nnx.State:
  """Restores parameters into ``abstract_state``; the recorded configuration must match ``cfg``."""
  from sam_jax.checkpoints.official import CheckpointError
  path = Path(path).absolute()
  recorded = read_config(path)
  if recorded.architecture() != cfg.architecture():
    raise CheckpointError(
        f'orbax checkpoint {path} holds a {variant_name(recorded) or "custom"} model '
        f'({recorded}), not the requested {variant_name(cfg) or "custom"} model ({cfg}).')
  from sam_jax.training import checkpointing  # a training workdir: its latest checkpoint
  if checkpointing.is_training_workdir(path):
    return checkpointing.load_model_state(path, abstract_state)
  target = jax.tree.map(lambda v: np.zeros(v.shape, v.dtype), _str_keys(nnx.to_pure_dict(abstract_state)))
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(path / PARAMS_DIR, target)
  state = jax.tree.map(lambda v: v, abstract_state)
  nnx.replace_by_pure_dict(state, _int_keys_like(restored, nnx.to_pure_dict(abstract_state)))
  return state


def _int_keys_like(tree, like):
  if isinstance(like, dict):
    return {k: _int_keys_like(tree[str(k)], v) for k, v in like.items()}
  return tree
