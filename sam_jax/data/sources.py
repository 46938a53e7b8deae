"""Built datasets as random-access sequences of records (``tfds`` ArrayRecord data sources).

A dataset is named ``<name>[/<config>]``: ``sa1b``; ``synthetic_shapes`` (=
``synthetic_shapes/default``) or ``synthetic_shapes/<config>``; ``coco_format/<name given at build
time>``; ``segment_anything`` (the TFDS catalogue's). It is read from
``<data_dir>/<name>/[<config>/]<version>/`` by ``tfds.builder_from_directory``: reading needs none
of the builders' code.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import tensorflow_datasets as tfds
from etils import epath

from sam_jax.data import record, segment_anything

CONFIGURED = ('synthetic_shapes', 'coco_format')  # stored per config: <name>/<config>/<version>

BUILD_COMMANDS = {
    'synthetic_shapes': 'python -m sam_jax.data.build synthetic_shapes --data_dir {data_dir}'
                        '{config_flag}',
    'sa1b': 'python -m sam_jax.data.build sa1b --data_dir {data_dir} '
            '--manual_dir <folder of SA-1B .tar shards and/or extracted .jpg + .json files>',
    'coco_format': 'python -m sam_jax.data.build coco --data_dir {data_dir} --name {config} '
                   '--annotations train=<instances_train.json>,validation=<instances_val.json> '
                   '--images <image folder>[,<image folder>...]',
    'segment_anything': 'tfds build segment_anything --data_dir {data_dir} --manual_dir <folder with '
                        'segment_anything_links.txt> --file_format array_record  (the TFDS '
                        'catalogue builder; it downloads SA-1B and needs apache-beam)',
}


class DatasetNotBuiltError(FileNotFoundError):
  """The dataset is not under the data dir; the message says how to build it."""


def default_data_dir() -> str:
  return os.path.expanduser(os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))


def split_name(dataset: str) -> tuple[str, str | None]:
  """'synthetic_shapes/tiny' -> ('synthetic_shapes', 'tiny'); configured datasets default 'default'."""
  name, _, config = dataset.partition('/')
  if name not in BUILD_COMMANDS:
    raise ValueError(f'Unknown dataset {dataset!r}: expected one of {sorted(BUILD_COMMANDS)}, '
                     f'with /<config> for {", ".join(CONFIGURED)}')
  if name in CONFIGURED:
    return name, config or 'default'
  return name, None


def build_command(dataset: str, data_dir: str) -> str:
  name, config = split_name(dataset)
  flag = f' --config {config}' if config and config != 'default' else ''
  return BUILD_COMMANDS[name].format(data_dir=data_dir, config=config, config_flag=flag)


def version_dir(dataset: str, data_dir: str | None = None) -> epath.Path:
  """The newest built version of ``dataset``; ``DatasetNotBuiltError`` naming the build command."""
  data_dir = data_dir or default_data_dir()
  name, config = split_name(dataset)
  root = epath.Path(data_dir) / name / (config or '')
  versions = []
  if root.exists():
    for d in root.iterdir():
      if (d / 'dataset_info.json').exists():
        try:
          versions.append((tfds.core.Version(d.name), d))
        except ValueError:
          continue
  if not versions:
    raise DatasetNotBuiltError(
        f'Dataset {dataset!r} is not built: no {root}/<version>/dataset_info.json.\n'
        f'Build it with:\n  {build_command(dataset, data_dir)}')
  return max(versions, key=lambda v: v[0])[1]


class MappedSource(Sequence):
  """A random-access source with a function applied to every element it returns."""

  def __init__(self, source: Sequence[Any], fn: Callable[[Any], Any]):
    self._source, self._fn = source, fn

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Any:
    return self._fn(self._source[index])


def open_source(dataset: str, data_dir: str | None = None, split: str = 'train'
                ) -> Sequence[dict[str, Any]]:
  """Random access to the records of a built dataset split (image left encoded)."""
  path = version_dir(dataset, data_dir)
  builder = tfds.builder_from_directory(path)
  file_format = builder.info.file_format
  if file_format is None or file_format.value != 'array_record':
    raise ValueError(
        f'{path} is stored as {file_format and file_format.value}; random access needs ArrayRecord. '
        f'Convert it in place with:\n  tfds convert_format --dataset_version_dir {path} '
        f'--out_file_format array_record')
  base = split.partition('[')[0]
  if base not in builder.info.splits:
    raise ValueError(f'{dataset!r} has no split {base!r}; it has {sorted(builder.info.splits)}')
  if split_name(dataset)[0] == 'segment_anything':
    source = builder.as_data_source(split=split, decoders=segment_anything.DECODERS)
    return MappedSource(source, segment_anything.to_record)
  return builder.as_data_source(split=split, decoders=record.DECODERS)
