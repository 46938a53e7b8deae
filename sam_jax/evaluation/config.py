"""The defaults every ``configs/eval/*.py`` starts from; every field can be set from the command
line (``--config.single_point.num_points=5``). Lists are comma-separated strings, so that they can
be too. One block of settings per protocol, named as the protocol; ``protocols`` says which run."""
from __future__ import annotations

import dataclasses

import ml_collections

from sam_jax.errors import ConfigError
from sam_jax.evaluation import instances, proposals, single_point

PROTOCOLS = {'single_point': single_point.Protocol, 'instances': instances.Protocol,
             'proposals': proposals.Protocol}


def _block(protocol) -> ml_collections.ConfigDict:
  """A protocol dataclass's defaults as a config block (tuples as comma-separated strings)."""
  return ml_collections.ConfigDict({k: ','.join(v) if isinstance(v, tuple) else v
                                    for k, v in dataclasses.asdict(protocol()).items()})


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
  c.progress = True           # a tqdm bar per dataset and protocol (process 0)
  c.protocols = 'single_point'  # which run, comma-separated: single_point, instances, proposals
  for name, protocol in PROTOCOLS.items():
    c[name] = _block(protocol)
  # instances.boxes: the detector's COCO results JSON; several datasets: 'dataset:split=path,...';
  # 'ground_truth': each mask's own box (an oracle detector)
  return c


def protocols(config: ml_collections.ConfigDict) -> dict[str, object]:
  """{name: Protocol} of the protocols ``config.protocols`` names, from their blocks."""
  names = [v.strip() for v in config.protocols.split(',') if v.strip()]
  unknown = [n for n in names if n not in PROTOCOLS]
  if unknown or not names:
    raise ConfigError(f'config.protocols {config.protocols!r}: choose from {list(PROTOCOLS)}')
  out = {}
  for name in names:
    cls = PROTOCOLS[name]
    kinds = {f.name: f.default for f in dataclasses.fields(cls)}
    values = {k: (tuple(s.strip() for s in v.split(',') if s.strip())
                  if isinstance(kinds.get(k), tuple) else v)
              for k, v in config[name].to_dict().items()}
    unknown = sorted(set(values) - set(kinds))
    if unknown:
      raise ConfigError(f'config.{name}: unknown settings {unknown}; known: {sorted(kinds)}')
    try:
      out[name] = cls(**values)
    except ValueError as e:  # the protocol's own check of its values
      raise ConfigError(f'config.{name}: {e}') from None
  return out


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
    raise ConfigError('config.datasets is empty: give "name:split[,name:split...]"')
  return out


def boxes_file(boxes: str, dataset: str) -> str:
  """The detector boxes of ``dataset`` ('name:split'): ``boxes`` is one path (every dataset) or
  'name:split=path,...'; 'ground_truth' for the dataset's own mask boxes."""
  if '=' not in boxes:
    if not boxes:
      raise ConfigError('the instances protocol needs detector boxes: '
                        '--config.instances.boxes=PATH (a COCO results JSON)')
    return boxes
  files = dict(item.strip().rsplit('=', 1) for item in boxes.split(',') if item.strip())
  if dataset not in files:
    raise ConfigError(f'config.instances.boxes names no boxes for {dataset} '
                      f'(it has {sorted(files)})')
  return files[dataset]
