"""Loading SAM weights: official .pth, Hugging Face safetensors, and our orbax directories."""
from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sam_jax.checkpoints import official, orbax_io
from sam_jax.checkpoints.official import CheckpointError
from sam_jax.modeling.config import SamConfig

__all__ = ['CheckpointError', 'existing', 'load_state', 'read_torch']


def read_torch(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """An official PyTorch ``.pth`` state dict as float32 numpy arrays (needs the torch extra)."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        f'Reading the PyTorch checkpoint {path} needs PyTorch: pip install "sam-jax[torch]". '
        'Without PyTorch, load the Hugging Face safetensors checkpoint instead (facebook/sam-vit-*'
        ' model.safetensors), or convert once where PyTorch is installed: python -m '
        'sam_jax.convert --model-type vit_b --checkpoint IN.pth --output DIR') from e
  try:
    sd = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
    raise CheckpointError(f'could not read {path} as a PyTorch state dict: '
                          f'{type(e).__name__}: {str(e).splitlines()[0]}') from e
  if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
    raise CheckpointError(f'{path} is not a SAM state dict (a dict of tensors)')
  return {k: v.detach().to(torch.float32).numpy() for k, v in sd.items()}


def read_state_dict(path: Path, cfg: SamConfig) -> dict[str, np.ndarray]:
  """Official-format tensors from a .pth file or a Hugging Face safetensors file / directory (whose
  config.json, if any, must describe ``cfg``'s architecture)."""
  if path.suffix == '.safetensors' or path.is_dir():
    from sam_jax.checkpoints import hf
    if mismatches := hf.config_mismatches(path, cfg):
      raise CheckpointError(f'{path}: its {hf.CONFIG_NAME} describes another model: '
                            + '; '.join(mismatches))
    tensors = hf.read_safetensors(path)
    return hf.hf_to_official(tensors) if hf.is_hf_state_dict(tensors) else tensors
  if path.suffix in ('.pth', '.pt', '.bin', '.ckpt'):
    return read_torch(path)
  raise CheckpointError(f'{path}: unknown checkpoint format; expected an official .pth file, a '
                        'Hugging Face model.safetensors file or directory, or an orbax directory '
                        'written by sam_jax.convert')


def existing(path: str | os.PathLike) -> Path:
  """``path`` as a Path; a FileNotFoundError naming it when nothing is there."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f'checkpoint {path} does not exist')
  return path


def load_state(path: str | os.PathLike, cfg: SamConfig, abstract_state: nnx.State) -> nnx.State:
  """Parameters for a model of configuration ``cfg`` from any supported checkpoint form."""
  path = existing(path)
  if orbax_io.is_orbax_checkpoint(path):  # restored as numpy: onto the device once, here, or
    # every jitted call would copy the parameters again
    return jax.tree.map(jnp.asarray, orbax_io.load(path, cfg, abstract_state))
  flat = official.check_and_convert(read_state_dict(path, cfg), cfg, abstract_state)
  state = jax_tree_copy(abstract_state)
  for p, var in nnx.to_flat_state(state):
    var.set_value(jnp.asarray(flat[p]))
  return state


def jax_tree_copy(state: nnx.State) -> nnx.State:
  import jax
  return jax.tree.map(lambda v: v, state)
