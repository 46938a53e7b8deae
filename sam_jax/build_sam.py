"""``sam_model_registry``: build a SAM model of a named size, random or from a checkpoint."""
from __future__ import annotations

import functools
import os

from flax import nnx

from sam_jax.checkpoints import load_state
from sam_jax.compilation_cache import enable_compilation_cache
from sam_jax.errors import ConfigError
from sam_jax.modeling.config import VARIANTS, SamConfig
from sam_jax.modeling.sam import Sam


def build_sam(variant: str | SamConfig, checkpoint: str | os.PathLike | None = None, *,
              seed: int = 0, dtype: str | None = None, attention: str | None = None,
              precision: str | None = None) -> Sam:
  """A SAM model: ``checkpoint`` None gives random weights from ``seed``.

  checkpoint: an official ``.pth``, a Hugging Face ``model.safetensors`` (file or its directory), or
  an orbax directory written by ``python -m sam_jax.convert``. dtype: compute dtype ("float32",
  "bfloat16"); parameters stay float32. attention, precision: the ``SamConfig`` fields (the
  encoder's attention form, 'auto' by default; matmul precision 'default' or 'highest').
  """
  enable_compilation_cache()  # a fresh process reuses earlier compilations (its docstring)
  if isinstance(variant, str):
    if variant not in VARIANTS:
      raise ConfigError(f'unknown SAM variant {variant!r}; choose one of {sorted(VARIANTS)}')
    cfg = VARIANTS[variant]
  else:
    cfg = variant
  overrides = dict(dtype=dtype, attention=attention, precision=precision)
  cfg = cfg.replace(**{k: v for k, v in overrides.items() if v is not None})
  if checkpoint is None:
    return Sam(cfg, rngs=nnx.Rngs(seed))
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: Sam(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, load_state(checkpoint, cfg, abstract_state))


sam_model_registry = {name: functools.partial(build_sam, name) for name in VARIANTS}
build_sam_vit_h = sam_model_registry['vit_h']
build_sam_vit_l = sam_model_registry['vit_l']
build_sam_vit_b = sam_model_registry['vit_b']
