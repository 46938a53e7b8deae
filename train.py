"""Train SAM: ``python train.py --config=configs/NAME.py[:arg] --workdir=DIR [--config.x=y ...]``.

Resume order: the workdir's latest checkpoint, else ``--config.init_checkpoint`` (any form the
model registry reads), else from scratch. A preemption notice (SIGTERM) saves the step under way
and stops the run, exit status 143 (under ``jax.distributed``: every host, at the step JAX's
preemption service names); so does Ctrl-C on one host, status 130. Multi-host, one train.py per
host: ``jax.distributed.initialize()`` runs with ``--distributed`` (JAX finds the cluster: TPU VM
pods, SLURM, Open MPI, Kubernetes), when the environment names one (SLURM_JOB_ID,
TPU_WORKER_HOSTNAMES, OMPI_COMM_WORLD_SIZE, or JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and
JAX_PROCESS_ID), or with ``--coordinator_address --num_processes --process_id``.

Before launching on a pod, check that the config fits, on any machine with the ``tpu`` extra:
``python train.py --config=configs/sam_vit_h.py:v5p-128 --compile_only --topology=v5p-128``
compiles the same sharded step from shapes alone and prints memory per chip against its HBM,
model FLOPs per step and the parameter / optimizer-state sharding (sam_jax/training/compile_only.py;
exit status 1 when it does not fit). Without --topology it compiles for this machine's devices.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from sam_jax import distributed, errors

config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py[:arg]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard events, summary.json '
                    '(with --compile_only: optional, receives compile_report.json).')
flags.DEFINE_bool('compile_only', False, 'Compile the train step and report memory per chip, '
                  'FLOPs and sharding; train nothing.')
flags.DEFINE_string('topology', None, 'With --compile_only: a TPU slice (v5p:4x4x4, v5p-128, '
                    'v5e-64, ...) or a GPU cluster estimate (h100:16x8); default: this machine.')
distributed.define_flags()
flags.mark_flags_as_required(['config'])
FLAGS = flags.FLAGS


def compile_only() -> int:
  """--compile_only: the report of sam_jax/training/compile_only.py; exit status 1: does not fit."""
  import jax
  if FLAGS.topology:  # the target's devices come from libtpu; this process computes on the CPU
    jax.config.update('jax_platforms', 'cpu')
  from sam_jax.training import compile_only as aot, topology
  try:
    target = topology.get_target(FLAGS.topology) if FLAGS.topology else topology.local_target()
    return aot.main(FLAGS.config, target, FLAGS.workdir)
  except (ValueError, RuntimeError) as e:
    if isinstance(e, jax.errors.JaxRuntimeError):
      raise
    print(f'error: {e}', file=sys.stderr)
    return 2


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.WARNING)  # orbax and absl are chatty at INFO
  logging.getLogger('sam_jax').setLevel(logging.INFO)
  if FLAGS.topology and not FLAGS.compile_only:
    raise app.UsageError('--topology is for --compile_only')
  if FLAGS.compile_only:
    sys.exit(compile_only())
  if not FLAGS.workdir:
    raise app.UsageError('--workdir is required (except with --compile_only)')
  distributed.initialize_from_flags()
  from sam_jax.training.loop import NonFiniteLossError, Stopped, train_and_evaluate
  try:
    with errors.exit_on_user_error():
      summary = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except NonFiniteLossError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(3)
  except Stopped as e:  # the shell's status for a process ended by that signal (143: SIGTERM)
    print(f'stopped: {e}', file=sys.stderr)
    sys.exit(128 + signal.Signals[e.signal])
  import jax
  if jax.process_index() == 0:
    miou = summary['eval']['miou']
    print(f'held-out mIoU after 1..{len(miou)} clicks: ' + ' '.join(f'{v:.3f}' for v in miou))


if __name__ == '__main__':
  app.run(main)
