"""Zero-shot evaluation: ``python eval.py --config=configs/eval/NAME.py[:arg] --workdir=OUT
[--config.checkpoint=...] [--config.x=y ...]``.

The checkpoint is anything ``sam_model_registry`` reads: an official ``.pth`` (name the variant:
``configs/eval/single_point.py:vit_h`` or ``--config.model=vit_h``), a Hugging Face safetensors
file, an orbax directory or a training workdir (their ``sam_config.json`` names the model).
Datasets are read through ``sam_jax.data.sources`` (build them with ``python -m
sam_jax.data.build``); the built-in synthetic shapes are built on first use. A dataset that is
missing or unreadable is reported and skipped, as are bad records inside one.

Writes ``OUT/results.json``, ``OUT/results.md``, ``OUT/miou_vs_points.png`` (after every dataset)
and ``OUT/logs/<dataset>.log``. Protocol: ``sam_jax.evaluation.single_point``.
"""
from __future__ import annotations

import logging
import os
import pathlib
import re
from typing import Any

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Evaluation config file (configs/eval/*.py[:arg]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Where results.json, results.md and the plot are written.')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS

log = logging.getLogger('sam_jax.eval')


def load_model(config) -> tuple[Any, dict[str, Any]]:
  """(Sam, a description for the report) from ``config.model`` / ``config.checkpoint``."""
  from sam_jax.build_sam import build_sam
  from sam_jax.checkpoints import orbax_io
  from sam_jax.modeling.config import variant_name
  checkpoint = config.checkpoint or None
  variant: Any = config.model
  if not variant:
    if checkpoint and orbax_io.is_orbax_checkpoint(pathlib.Path(checkpoint)):
      variant = orbax_io.read_config(checkpoint)
    else:
      raise ValueError('name the model (--config.model=vit_h, or configs/eval/NAME.py:vit_h): '
                       f'{checkpoint or "random weights"} does not record it (only orbax '
                       'directories and training workdirs do)')
  if checkpoint is None:
    log.warning('no --config.checkpoint: evaluating RANDOM weights (seed %d)', config.seed)
  model = build_sam(variant, checkpoint, seed=config.seed, dtype=config.model_dtype)
  name = variant if isinstance(variant, str) else (variant_name(variant) or 'custom')
  return model, {'variant': name, 'checkpoint': checkpoint or '', 'dtype': config.model_dtype,
                 'config': model.config.to_dict()}


def open_dataset(name: str, split: str, data_dir: str | None):
  """The dataset's records; the predefined synthetic shapes are built on first use."""
  from sam_jax.data import sources
  try:
    return sources.open_source(name, data_dir, split)
  except sources.DatasetNotBuiltError:
    base, sub = sources.split_name(name)
    if base != 'synthetic_shapes' or sub not in ('default', 's1024'):
      raise
    from sam_jax.data import build
    log.info('building %s in %s (first use)', name, data_dir or sources.default_data_dir())
    build.build('synthetic_shapes', data_dir, config=sub)
    return sources.open_source(name, data_dir, split)


def run(config, workdir: str) -> dict[str, Any]:
  """Evaluates ``config`` and writes the reports in ``workdir``; returns the results."""
  import jax
  from sam_jax import SamPredictor
  from sam_jax.evaluation import config as eval_config
  from sam_jax.evaluation import report, single_point

  protocol = eval_config.protocol(config)
  datasets = eval_config.datasets(config)
  model, model_info = load_model(config)
  predictor = SamPredictor(model)
  results = {'model': model_info,
             'protocol': {'name': 'single_point', **{k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in vars(protocol).items()}},
             'config': config.to_dict(), 'datasets': {}}
  writer = jax.process_index() == 0
  os.makedirs(os.path.join(workdir, 'logs'), exist_ok=True)
  for name, split in datasets:
    key = f'{name}:{split}'
    handler = logging.FileHandler(
        os.path.join(workdir, 'logs', re.sub(r'[^A-Za-z0-9_.-]+', '_', key) + '.log'), mode='w')
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
    logging.getLogger('sam_jax').addHandler(handler)
    try:
      try:
        source = open_dataset(name, split, config.data_dir or None)
      except (FileNotFoundError, ValueError) as e:  # not built, no such split, not ArrayRecord
        log.error('%s: skipped: %s', key, e)
        results['datasets'][key] = {'error': str(e)}
        continue
      res = single_point.evaluate_source(predictor, source, protocol, name=key,
                                         max_images=config.max_images, progress=config.progress)
      results['datasets'][key] = res
      for variant, r in res['variants'].items():
        miou = ' '.join(f'{p}:{100 * r["miou"][str(p)]:.1f}'
                        for p in report.reported_points(protocol.num_points)
                        if r['miou'][str(p)] is not None)
        log.info('%s (%s first click): %d masks of %d images, mIoU %% by points %s, oracle@1 '
                 '%s', key, variant, res['masks'], res['images'], miou or '-',
                 r['oracle_miou_1'] is not None and f'{100 * r["oracle_miou_1"]:.1f}')
    finally:
      logging.getLogger('sam_jax').removeHandler(handler)
      handler.close()
      if writer:
        report.write(results, workdir)
  return results


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.WARNING)  # orbax and absl are chatty at INFO
  logging.getLogger('sam_jax').setLevel(logging.INFO)
  run(FLAGS.config, FLAGS.workdir)
  print(open(os.path.join(FLAGS.workdir, 'results.md')).read())


if __name__ == '__main__':
  app.run(main)
