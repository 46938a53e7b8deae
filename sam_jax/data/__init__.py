"""Training data: TFDS builders (SA-1B folders / tars, COCO / LVIS, synthetic shapes), the catalogue's
``segment_anything`` adapter, and the Grain input pipeline (see ``pipeline`` for the batch layout).

Build a dataset: ``python -m sam_jax.data.build <synthetic_shapes|sa1b|coco> --data_dir ...``.
The names below are imported on first use, so that ``sam_jax.data.preprocess`` and ``config``
(numpy only) load without the data extra (TFDS, Grain), e.g. for benchmarks on synthetic batches.
"""
import importlib

from sam_jax.data.config import InputConfig

_LAZY = {'InputPipeline': 'pipeline', 'batch_spec': 'preprocess', 'COUNTERS': 'preprocess',
         'DatasetNotBuiltError': 'sources', 'open_source': 'sources'}

__all__ = ['COUNTERS', 'DatasetNotBuiltError', 'InputConfig', 'InputPipeline', 'batch_spec',
           'open_source']


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f'sam_jax.data.{_LAZY[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
