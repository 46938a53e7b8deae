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

import pytest  # noqa: E402
import torchvision_shim  # noqa: E402

torchvision_shim.install()

# The longest modules first (make test's durations, longest first): pytest-xdist gives a worker a
# whole module at a time (--dist loadfile, in collection order with --no-loadscope-reorder), and a
# long one handed out last leaves the other worker idle for minutes.
SLOW_MODULES = ('test_train_resume.py', 'test_compile_only.py', 'test_train_sharding.py',
                'test_train_multihost.py', 'test_parity.py', 'test_training_losses.py',
                'test_automatic_mask_generator.py', 'test_attention_paths.py',
                'test_eval_parallel.py', 'test_scratch_init.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as collected


PARITY_REPORT: list[str] = []  # lines added by parity tests, printed in the terminal summary
_REPORTED: list[str] = []      # the lines, as they came back in the tests' reports


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
  """Moves the lines a test added into its report: reports are what reach the main process from
  pytest-xdist's workers (``make test`` runs two)."""
  report = yield
  report.user_properties.extend(('parity', line) for line in PARITY_REPORT)
  PARITY_REPORT.clear()
  return report


def pytest_runtest_logreport(report):
  _REPORTED.extend(line for key, line in report.user_properties if key == 'parity')


def pytest_terminal_summary(terminalreporter):
  if _REPORTED:
    terminalreporter.section('parity against segment-anything 1.0 / transformers (measured)')
    for line in _REPORTED:
      terminalreporter.write_line(line)
