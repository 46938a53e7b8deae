"""JAX's persistent compilation cache, turned on for SAM's inference entry points.

A fresh process otherwise compiles the encoder, the decoder and the generator's programs again on
its first call (30 s on an H100 for the vit_b generator). ``build_sam`` (``sam_model_registry``) and
``SamPredictor`` (so the generator and the command lines too) call ``enable_compilation_cache()``,
not the import: importing the package writes nothing to the disk. The folder is, in order of
precedence:

1. one the user configured through jax (``jax.config.update('jax_compilation_cache_dir', ...)`` or
   ``JAX_COMPILATION_CACHE_DIR``): left as it is, with jax's other cache settings;
2. ``SAM_JAX_COMPILATION_CACHE``: a folder, or ``0`` / ``off`` / ``false`` to leave the cache off
   (the tests set ``0``);
3. ``$XDG_CACHE_HOME/sam_jax/jax_cache`` (``~/.cache/sam_jax/jax_cache`` when that is unset).

jax keeps only programs that took at least ``jax_persistent_cache_min_compile_time_secs`` to compile
(default 1 s); where this module sets the folder it lowers that to ``MIN_COMPILE_TIME_S``, so the
generator's small programs (NMS, mask pasting: 0.2 to 0.3 s each on this CPU) are kept too. The
cache is trusted code: do not point it at a folder that others can write.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

ENV = 'SAM_JAX_COMPILATION_CACHE'
OFF = ('0', 'off', 'false', 'no', '')
MIN_COMPILE_TIME_S = 0.1
_JAX_DEFAULT_MIN_COMPILE_TIME_S = 1.0


def default_cache_dir() -> Path:
  """``$XDG_CACHE_HOME/sam_jax/jax_cache``, else ``~/.cache/sam_jax/jax_cache``."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return Path(base) / 'sam_jax' / 'jax_cache'


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
  """Turns on jax's persistent compilation cache; returns the folder in use, or None when off.

  path: the folder, else ``SAM_JAX_COMPILATION_CACHE``, else ``default_cache_dir()``. A folder the
  user already gave jax wins over all of these (this module's docstring). Safe to call many times.
  """
  configured = jax.config.jax_compilation_cache_dir
  if configured:
    return configured
  if path is None:
    env = os.environ.get(ENV)
    if env is not None and env.strip().lower() in OFF:
      return None
    path = env or default_cache_dir()
  try:
    Path(path).mkdir(parents=True, exist_ok=True)
  except OSError as e:
    logging.warning('sam_jax: no persistent compilation cache (cannot create %s: %s); set %s to a '
                    'writable folder or to 0', path, e, ENV)
    return None
  jax.config.update('jax_compilation_cache_dir', str(path))
  if jax.config.jax_persistent_cache_min_compile_time_secs == _JAX_DEFAULT_MIN_COMPILE_TIME_S:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_TIME_S)
  return str(path)
