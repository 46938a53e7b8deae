r"""Builds a dataset as TFDS ArrayRecord files, one command per dataset.

  # Synthetic shapes (no download): the tiny config's default, 256 px, 2000 train + 200 validation.
  python -m sam_jax.data.build synthetic_shapes --data_dir ~/tensorflow_datasets
  python -m sam_jax.data.build synthetic_shapes --data_dir ~/tensorflow_datasets --config s1024
  python -m sam_jax.data.build synthetic_shapes --data_dir ~/tensorflow_datasets --config mine \
      --image_size 512 --num_train 10000 --num_validation 500 --seed 1  # -> synthetic_shapes/mine

  # SA-1B: the folder of its .tar shards (or of extracted .jpg + .json pairs).
  python -m sam_jax.data.build sa1b --data_dir ~/tensorflow_datasets --manual_dir /data/sa1b

  # COCO / LVIS instance annotations: split=json pairs and the image folders.
  python -m sam_jax.data.build coco --data_dir ~/tensorflow_datasets --name coco2017 \
      --annotations train=/coco/annotations/instances_train2017.json,\
validation=/coco/annotations/instances_val2017.json \
      --images /coco/train2017,/coco/val2017

The pipeline then reads ``synthetic_shapes[/<config>]``, ``sa1b`` or ``coco_format/<name>`` from
``--data_dir`` (default $TFDS_DATA_DIR or ~/tensorflow_datasets). The TFDS catalogue's own
``segment_anything`` is built by TFDS (see ``sam_jax.data.segment_anything``).
"""
from __future__ import annotations

import os

import tensorflow_datasets as tfds
from absl import app, flags

from sam_jax.data import coco_format, sa1b, sources, synthetic_shapes

DATASETS = ('synthetic_shapes', 'sa1b', 'coco')



def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags (defined on demand: importing this module defines none, so it never
  collides with a trainer's --config / --data_dir)."""
  flags.DEFINE_string('data_dir', None, 'Where datasets live (default $TFDS_DATA_DIR or '
                      '~/tensorflow_datasets).', flag_values=fv)
  flags.DEFINE_string('config', 'default', 'synthetic_shapes: a predefined config (default, s1024) '
                      'or the name of a new one made from the flags below.', flag_values=fv)
  flags.DEFINE_integer('image_size', None, 'synthetic_shapes: long side in px.', flag_values=fv)
  flags.DEFINE_integer('num_train', None, 'synthetic_shapes: train images.', flag_values=fv)
  flags.DEFINE_integer('num_validation', None, 'synthetic_shapes: validation images.',
                       flag_values=fv)
  flags.DEFINE_integer('seed', None, 'synthetic_shapes: seed.', flag_values=fv)
  flags.DEFINE_string('manual_dir', None, 'sa1b: folder of .tar shards and/or .jpg + .json files.',
                      flag_values=fv)
  flags.DEFINE_string('name', 'default', 'coco: the name to read it back by (coco_format/<name>).',
                      flag_values=fv)
  flags.DEFINE_list('annotations', [], 'coco: split=path.json entries (a bare path means train).',
                    flag_values=fv)
  flags.DEFINE_list('images', [], 'coco: folders the images are searched in.', flag_values=fv)


def synthetic_shapes_builder(data_dir: str, config: str = 'default', **overrides
                             ) -> synthetic_shapes.SyntheticShapes:
  """A predefined config, or a new one named ``config`` with the given overrides."""
  overrides = {k: v for k, v in overrides.items() if v is not None}
  predefined = {c.name: c for c in synthetic_shapes.SyntheticShapes.BUILDER_CONFIGS}
  if config in predefined and not overrides:
    return synthetic_shapes.SyntheticShapes(config=config, data_dir=data_dir)
  if config in predefined:
    raise ValueError(f'{config!r} is predefined; name a new config (--config) to change '
                     f'{sorted(overrides)}')
  cfg = synthetic_shapes.SyntheticShapesConfig(name=config, **overrides)
  return synthetic_shapes.SyntheticShapes(config=cfg, data_dir=data_dir)


def coco_builder(data_dir: str, name: str, annotations: list[str] | dict[str, str],
                 images: list[str]) -> coco_format.CocoFormat:
  if isinstance(annotations, (list, tuple)):
    annotations = dict(a.split('=', 1) if '=' in a else ('train', a) for a in annotations)
  cfg = coco_format.CocoFormatConfig(name=name, annotations=dict(annotations),
                                     images=tuple(images))
  return coco_format.CocoFormat(config=cfg, data_dir=data_dir)


def build(dataset: str, data_dir: str | None = None, manual_dir: str | None = None,
          **kwargs) -> str:
  """Builds ``dataset`` ('synthetic_shapes', 'sa1b' or 'coco'); returns where it was written."""
  data_dir = data_dir or sources.default_data_dir()
  download_config = None
  if dataset == 'synthetic_shapes':
    builder = synthetic_shapes_builder(data_dir, **kwargs)
  elif dataset == 'sa1b':
    if not manual_dir:
      raise ValueError('sa1b needs --manual_dir: ' + sa1b.MANUAL_DOWNLOAD_INSTRUCTIONS)
    builder = sa1b.Sa1b(data_dir=data_dir)
    download_config = tfds.download.DownloadConfig(manual_dir=os.path.expanduser(manual_dir))
  elif dataset == 'coco':
    builder = coco_builder(data_dir, **kwargs)
  else:
    raise ValueError(f'Unknown dataset {dataset!r}; expected one of {DATASETS}. The TFDS '
                     f'catalogue\'s segment_anything is built by TFDS:\n  '
                     f'{sources.build_command("segment_anything", data_dir)}')
  builder.download_and_prepare(download_config=download_config)
  return os.fspath(builder.data_dir)


def main(argv: list[str], fv: flags.FlagValues = flags.FLAGS) -> None:
  if len(argv) != 2:
    raise app.UsageError(f'Usage: python -m sam_jax.data.build {{{",".join(DATASETS)}}} [flags]')
  dataset = argv[1]
  kwargs = {}
  if dataset == 'synthetic_shapes':
    kwargs = dict(config=fv.config, image_size=fv.image_size, num_train=fv.num_train,
                  num_validation=fv.num_validation, seed=fv.seed)
  elif dataset == 'coco':
    kwargs = dict(name=fv.name, annotations=fv.annotations, images=fv.images)
  path = build(dataset, fv.data_dir, fv.manual_dir, **kwargs)
  print(f'Built {dataset} in {path}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
