"""Multi-host set-up and host-to-host exchange shared by ``train.py`` and ``eval.py``.

``initialize``: ``jax.distributed.initialize`` from flags (coordinator, process count and id), or
from the environment where a cluster says so (SLURM, Open MPI, JAX_* variables), or letting JAX
detect it (``--distributed``: TPU VM pods).
``allgather_json``: every process's JSON-serialisable value, on every process (evaluation results
gathered for process 0 to score and write).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

CLUSTER_ENV = ('JAX_COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES', 'SLURM_JOB_ID',
               'OMPI_COMM_WORLD_SIZE')


def define_flags() -> None:
  """The multi-host flags of ``train.py`` and ``eval.py``."""
  from absl import flags
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host).')
  flags.DEFINE_integer('num_processes', None, 'Processes in the job (multi-host).')
  flags.DEFINE_integer('process_id', None, 'This process (multi-host).')
  flags.DEFINE_integer('local_device_count', None, 'CPU only: devices per process (tests).')
  flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() and let JAX detect '
                    'the cluster (needed on TPU VM pods, whose environment names none).')


def initialize_from_flags() -> None:
  """``initialize`` with ``define_flags``'s flags."""
  from absl import flags
  f = flags.FLAGS
  initialize(f.coordinator_address, f.num_processes, f.process_id, f.local_device_count,
             f.distributed)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_count: int | None = None,
               detect: bool = False) -> None:
  """Joins the job when the arguments or the environment name one; a no-op on a single host.
  ``detect``: let JAX find the cluster (TPU VM pods); ``local_device_count``: CPU devices of this
  process (tests of multi-device code on CPU)."""
  if local_device_count:
    jax.config.update('jax_num_cpu_devices', local_device_count)
  if coordinator_address:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif detect or (any(k in os.environ for k in CLUSTER_ENV)
                  and int(os.environ.get('JAX_NUM_PROCESSES', '2')) > 1):
    count, index = os.environ.get('JAX_NUM_PROCESSES'), os.environ.get('JAX_PROCESS_ID')
    jax.distributed.initialize(num_processes=int(count) if count else None,
                               process_id=int(index) if index else None)


def allgather_json(value: Any) -> list[Any]:
  """[value of process 0, value of process 1, ...] on every process (``[value]`` on one)."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int64)))  # (P, 1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:len(data)] = data
  every = np.asarray(multihost_utils.process_allgather(buf))  # (P, max size)
  return [json.loads(every[p, :int(n)].tobytes()) for p, n in enumerate(sizes[:, 0])]
