"""Test setup: the torchvision stand-in for segment-anything, and a parity report printed at the end."""
import os
import sys

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
# The tests run on the CPU; with libtpu installed (the tpu extra, for the compile-only tests) jax
# would otherwise probe for a TPU in every process and hold libtpu's machine-wide lock.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# No persistent compilation cache in tests (sam_jax.compilation_cache): each test compiles afresh and
# writes nothing under the user's cache folder; the cache's own test sets a temporary folder.
os.environ['SAM_JAX_COMPILATION_CACHE'] = '0'
sys.path.insert(0, os.path.dirname(__file__))

import torchvision_shim  # noqa: E402

torchvision_shim.install()

PARITY_REPORT: list[str] = []  # lines added by parity tests, printed in the terminal summary


def pytest_terminal_summary(terminalreporter):
  if PARITY_REPORT:
    terminalreporter.section('parity against segment-anything 1.0 / transformers (measured)')
    for line in PARITY_REPORT:
      terminalreporter.write_line(line)
