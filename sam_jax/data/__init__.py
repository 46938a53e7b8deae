"""Training data: TFDS builders (SA-1B folders / tars, COCO / LVIS, synthetic shapes), the catalogue's
``segment_anything`` adapter, and the Grain input pipeline (see ``pipeline`` for the batch layout).

Build a dataset: ``python -m sam_jax.data.build <synthetic_shapes|sa1b|coco> --data_dir ...``.
"""
from sam_jax.data.config import InputConfig
from sam_jax.data.pipeline import InputPipeline, batch_spec
from sam_jax.data.preprocess import COUNTERS
from sam_jax.data.sources import DatasetNotBuiltError, open_source

__all__ = ['COUNTERS', 'DatasetNotBuiltError', 'InputConfig', 'InputPipeline', 'batch_spec',
           'open_source']
