"""Train SAM: ``python train.py --config=configs/NAME.py[:arg] --workdir=DIR [--config.x=y ...]``.

Resume order: the workdir's latest checkpoint, else ``--config.init_checkpoint`` (any form the
model registry reads), else from scratch. Multi-host: ``jax.distributed.initialize()`` runs when
the environment describes a cluster (TPU pods, SLURM, or JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID) or when ``--coordinator_address`` is given.
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py[:arg]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard events, summary.json.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host).')
flags.DEFINE_integer('num_processes', None, 'Processes in the job (multi-host).')
flags.DEFINE_integer('process_id', None, 'This process (multi-host).')
flags.DEFINE_integer('local_device_count', None, 'CPU only: devices per process (tests).')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS

CLUSTER_ENV = ('JAX_COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES', 'SLURM_JOB_ID',
               'OMPI_COMM_WORLD_SIZE')


def initialize_distributed() -> None:
  import jax
  if FLAGS.local_device_count:
    jax.config.update('jax_num_cpu_devices', FLAGS.local_device_count)
  if FLAGS.coordinator_address:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif any(k in os.environ for k in CLUSTER_ENV) and int(os.environ.get('JAX_NUM_PROCESSES',
                                                                       '2')) > 1:
    jax.distributed.initialize()


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.WARNING)  # orbax and absl are chatty at INFO
  logging.getLogger('sam_jax').setLevel(logging.INFO)
  initialize_distributed()
  from sam_jax.training.loop import NonFiniteLossError, train_and_evaluate
  try:
    summary = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except NonFiniteLossError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(3)
  import jax
  if jax.process_index() == 0:
    miou = summary['eval']['miou']
    print(f'held-out mIoU after 1..{len(miou)} clicks: ' + ' '.join(f'{v:.3f}' for v in miou))


if __name__ == '__main__':
  app.run(main)
