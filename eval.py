"""Zero-shot evaluation: ``python eval.py --config=configs/eval/NAME.py[:arg] --workdir=OUT
[--config.checkpoint=...] [--config.x=y ...]``.

The checkpoint is anything ``sam_model_registry`` reads: an official ``.pth`` (name the variant:
``configs/eval/single_point.py:vit_h`` or ``--config.model=vit_h``), a Hugging Face safetensors
file, an orbax directory or a training workdir (their ``sam_config.json`` names the model).
Datasets are read through ``sam_jax.data.sources`` (build them with ``python -m
sam_jax.data.build``); the built-in synthetic shapes are built on first use. A dataset that is
missing or unreadable is reported and skipped, as are bad records inside one.

Protocols (``--config.protocols=single_point,instances,proposals``, settings in the block of each
name): ``sam_jax.evaluation.single_point`` (mIoU after 1..9 clicks), ``.instances`` (mask AP from
detector boxes, ``--config.instances.boxes=DETECTIONS.json``) and ``.proposals`` (mask AR@1000 of
the automatic mask generator). The images are dealt to the processes of a multi-host job
(``--coordinator_address``, ``--num_processes``, ``--process_id``, ``--distributed``, or a cluster's
environment, as ``train.py``) and to each one's local devices; process 0 gathers the results and writes
``OUT/results.json``, ``OUT/results.md``, ``OUT/miou_vs_points.png`` (after every dataset) and
``OUT/logs/<dataset>.log``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from sam_jax import distributed, errors

config_flags.DEFINE_config_file('config', None, 'Evaluation config file (configs/eval/*.py[:arg]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Where results.json, results.md and the plot are written.')
distributed.define_flags()
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS

log = logging.getLogger('sam_jax.eval')


def load_model(config) -> tuple[Any, dict[str, Any]]:
  """(Sam, a description for the report) from ``config.model`` / ``config.checkpoint``."""
  from sam_jax.build_sam import build_sam
  from sam_jax.checkpoints import existing, orbax_io
  from sam_jax.modeling.config import variant_name
  checkpoint = config.checkpoint or None
  variant: Any = config.model
  if checkpoint:
    existing(checkpoint)  # said before "name the model", which a missing file would get instead
  if not variant:
    if checkpoint and orbax_io.is_orbax_checkpoint(pathlib.Path(checkpoint)):
      variant = orbax_io.read_config(checkpoint)
    else:
      raise errors.ConfigError(
          'name the model (--config.model=vit_h, or configs/eval/NAME.py:vit_h): '
          f'{checkpoint or "random weights"} does not record it (only orbax directories and '
          'training workdirs do)')
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


def evaluate(name: str, protocol, workers: dict[str, list], source, key: str, config
             ) -> dict[str, Any] | None:
  """One protocol on one dataset, split over the job's hosts and local devices; the figures on
  process 0 (COCOeval and its ground truth are built there only), None on the others."""
  import jax
  from sam_jax.evaluation import config as eval_config
  from sam_jax.evaluation import instances, parallel, proposals, single_point
  progress = config.progress
  records = range(len(source) if not config.max_images else min(len(source), config.max_images))
  if name == 'single_point':
    selected, selection = single_point.select_masks(source, protocol, name=key,
                                                    max_images=config.max_images)
    per_image = parallel.run_split(single_point.run_images, workers['predictors'], source,
                                   selected, protocol, name=key, progress=progress)
  elif name == 'instances':
    protocol = dataclasses.replace(protocol,
                                   boxes=eval_config.boxes_file(protocol.boxes, key))
    detections = instances.load_detections(protocol.boxes, source, records)
    per_image = parallel.run_split(instances.run_images, workers['predictors'], source, records,
                                   protocol, name=key, progress=progress, detections=detections)
  else:
    generators = workers.setdefault('generators', [proposals.make_generator(m, protocol)
                                                   for m in workers['models']])
    per_image = parallel.run_split(proposals.run_images, generators, source, records, protocol,
                                   name=key, progress=progress)
  if jax.process_index() != 0:
    return None
  if name == 'single_point':
    return single_point.summarize(per_image, protocol, selection)
  if name == 'instances':
    res = instances.summarize(source, per_image, protocol, name=key, detections=detections)
  else:
    res = proposals.summarize(source, per_image, protocol, name=key)
  return {'records_read': len(records), **res, 'protocol': dataclasses.asdict(protocol)}


def summary_line(name: str, res: dict[str, Any]) -> str:
  """The log line of one protocol's figures on one dataset."""
  from sam_jax.evaluation import report
  if name != 'single_point':
    figures = ', '.join(f'{k} {report.fmt(v)}' for k, v in res['metrics'].items())
    return f'{res["images"]} images: {figures} (%)'
  out = []
  for variant, r in res['variants'].items():
    miou = ' '.join(f'{p}:{report.fmt(r["miou"][str(p)])}'
                    for p in report.reported_points(len(r['miou'])) if r['miou'][str(p)] is not None)
    by_area = ' '.join(f'{k} {report.fmt(a["miou"]["1"])} ({a["masks"]})'
                       for k, a in r['by_area'].items())
    out.append(f'{variant} first click: mIoU % by points {miou or "-"}, oracle@1 '
               f'{report.fmt(r["oracle_miou_1"])}, 1 point by area {by_area}')
  return f'{res["masks"]} masks of {res["images"]} images; ' + '; '.join(out)


def run(config, workdir: str) -> dict[str, Any]:
  """Evaluates ``config`` and writes the reports in ``workdir`` (process 0); returns the
  results."""
  import jax
  from sam_jax import SamPredictor
  from sam_jax.evaluation import config as eval_config
  from sam_jax.evaluation import parallel, report

  protocols = eval_config.protocols(config)
  datasets = eval_config.datasets(config)
  model, model_info = load_model(config)
  models = parallel.on_devices(model)
  workers = {'models': models, 'predictors': [SamPredictor(m) for m in models]}
  log.info('evaluating on %d process(es) x %d local device(s)', jax.process_count(), len(models))
  results = {'model': model_info,
             'protocols': {n: dataclasses.asdict(p) for n, p in protocols.items()},
             'config': config.to_dict(), **{n: {} for n in protocols}}
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
        for protocol_name in protocols:
          results[protocol_name][key] = {'error': str(e)}
        continue
      for protocol_name, protocol in protocols.items():
        start = time.time()
        try:
          res = evaluate(protocol_name, protocol, workers, source, key, config)
        except (FileNotFoundError, ValueError) as e:  # e.g. no detector boxes for this dataset
          log.error('%s: %s skipped: %s', key, protocol_name, e)
          results[protocol_name][key] = {'error': str(e)}
          continue
        if res is None:  # not process 0: it gathered this host's images and writes the figures
          continue
        results[protocol_name][key] = {**res, 'seconds': round(time.time() - start, 2)}
        log.info('%s, %s: %s', key, protocol_name, summary_line(protocol_name, res))
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
  distributed.initialize_from_flags()
  with errors.exit_on_user_error():
    run(FLAGS.config, FLAGS.workdir)
  import jax
  if jax.process_index() == 0:
    print(open(os.path.join(FLAGS.workdir, 'results.md')).read())


if __name__ == '__main__':
  app.run(main)
