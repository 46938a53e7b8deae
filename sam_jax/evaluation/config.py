"""The defaults every ``configs/eval/*.py`` starts from; every field can be set from the command
line (``--config.protocol.num_points=5``). Lists are comma-separated strings, so that they can be
too."""
from __future__ import annotations

import ml_collections

from sam_jax.evaluation.single_point import Protocol


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = ''                # a sam_jax VARIANTS name; '' reads it from the checkpoint's
                              # sam_config.json (an orbax directory or a training workdir)
  c.checkpoint = ''           # official .pth / HF safetensors / orbax dir / training workdir;
                              # '' evaluates random weights (seed), for smoke tests only
  c.model_dtype = 'float32'   # compute dtype ('bfloat16' on accelerators)
  c.seed = 0                  # random weights when there is no checkpoint
  c.data_dir = ''             # '' : $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.datasets = ''             # 'name:split,name:split' (sam_jax.data.sources names)
  c.max_images = 0            # per dataset, the first records only (0: all)
  c.progress = True           # a tqdm bar per dataset
  p = Protocol()
  c.protocol = ml_collections.ConfigDict(dict(
      name='single_point',
      num_points=p.num_points,
      first_points=','.join(p.first_points),  # 'center' and / or 'random'
      seed=p.seed, max_masks=p.max_masks, subsample_to=p.subsample_to, batch_size=p.batch_size,
      pad_to=p.pad_to))
  return c


def protocol(config: ml_collections.ConfigDict) -> Protocol:
  """The ``Protocol`` of a config's ``protocol`` block."""
  p = config.protocol
  if p.name != 'single_point':
    raise ValueError(f'protocol {p.name!r}: only "single_point" is implemented')
  return Protocol(num_points=p.num_points,
                  first_points=tuple(v.strip() for v in p.first_points.split(',') if v.strip()),
                  seed=p.seed, max_masks=p.max_masks, subsample_to=p.subsample_to,
                  batch_size=p.batch_size, pad_to=p.pad_to)


def datasets(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """'coco_format/coco2017:validation,sa1b:train[99%:]' -> [(name, split), ...] (split default
  'validation')."""
  out = []
  for item in config.datasets.split(','):
    item = item.strip()
    if item:
      name, _, split = item.partition(':')
      out.append((name, split or 'validation'))
  if not out:
    raise ValueError('config.datasets is empty: give "name:split[,name:split...]"')
  return out
