"""Errors that name a user's mistake, and how the command-line tools report them."""
from __future__ import annotations

import contextlib
import sys


class ConfigError(ValueError):
  """A config value out of its range, unknown, or at odds with another or with the machine."""


@contextlib.contextmanager
def exit_on_user_error(status: int = 2):
  """Around a tool's work (train.py, eval.py): a ConfigError, a CheckpointError or a missing file
  is printed as ``error: MESSAGE`` with exit ``status``, not as a traceback; other errors are
  bugs and keep theirs."""
  from sam_jax.checkpoints.official import CheckpointError
  try:
    yield
  except (ConfigError, CheckpointError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(status)
