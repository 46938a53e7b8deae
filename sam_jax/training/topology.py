"""Compile targets: a TPU slice or a GPU cluster, named as on the command line, as compile-only
devices (no accelerator needed).

  v5p:4x4x4  v5e:8x8  v6e:4x4          libtpu topology names (chips along each axis)
  v5p-128  v5litepod-64  v5e-64  v6e-64   Cloud TPU accelerator types, standard shapes (v5p counts
                                        TensorCores, 2 per chip; v5e / v6e count chips)
  h100:16x8  h200:4x8  a100:2x8         a GPU cluster, nodes x GPUs per node: an ESTIMATE (below)

TPU devices come from libtpu's compile-only client (``jax.experimental.topologies``, the ``tpu``
extra). JAX 0.10 cannot compile for a GPU without one (jax-ml/jax#23971), so a GPU cluster is
compiled for a TPU v5p slice with as many chips and the same mesh: argument and output bytes follow
from the shardings and are exact; temporaries are XLA's TPU compiler's, which fuses and schedules
differently from the GPU's (cuDNN attention, no TPU layouts), so they are an estimate.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Sequence

import jax

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int       # usable per device: what XLA's TPU compiler reports as available HBM;
                       # for GPUs, the device's memory
  peak_flops: float    # dense bf16 per device


# HBM as libtpu 0.0.42's compiler reports it when a program does not fit ("exceeds available
# HBM (95.74G)"); peak bf16 FLOP/s from the Cloud TPU and NVIDIA data sheets.
CHIPS = {
    'v5p': Chip('TPU v5p', int(95.74 * GiB), 459e12),
    'v5e': Chip('TPU v5e', int(15.75 * GiB), 197e12),
    'v6e': Chip('TPU v6e', int(31.25 * GiB), 918e12),
    'h100': Chip('H100 80GB', 84_929_347_584, 989e12),
    'h200': Chip('H200 141GB', 150_754_820_096, 989e12),
    'a100': Chip('A100 80GB', 85_899_345_920, 312e12),
}
# Standard slice shapes by chip count (Cloud TPU docs).
SHAPES_3D = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8',
             256: '4x8x8', 512: '8x8x8', 1024: '8x8x16', 2048: '8x16x16', 4096: '16x16x16'}
SHAPES_2D = {4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16', 256: '16x16'}
ALIASES = {'v5litepod': 'v5e'}
FORMS = ('v5p:4x4x4, v5e:8x8, v6e:4x4 (libtpu topology), v5p-128, v5litepod-64 / v5e-64, '
         'v6e-64 (Cloud TPU type), h100:16x8, h200:4x8, a100:2x8 (GPU nodes x GPUs per node, '
         'an estimate)')


@dataclasses.dataclass(frozen=True)
class Target:
  """Devices to compile for, and what to compare the result with."""
  name: str                     # as given
  topology: str                 # what was compiled for: libtpu's name, or 'this machine'
  chip: Chip | None             # None: unknown memory (e.g. this machine's CPU)
  devices: Sequence[jax.Device]
  num_processes: int            # hosts / nodes: one train.py each
  estimate: str = ''            # '' when compiled for this very hardware; else what is estimated

  @property
  def num_devices(self) -> int:
    return len(self.devices)


def parse(name: str) -> tuple[str, str, int]:
  """A target name -> (chip key, libtpu topology, processes (0: from the devices)).
  Raises ValueError naming the accepted forms."""
  name = name.strip().lower()
  if m := re.fullmatch(r'(v5p|v5e|v6e):(\d+(?:x\d+){1,2})', name):
    return m[1], name, 0
  if m := re.fullmatch(r'(v5p|v5e|v5litepod|v6e)-(\d+)', name):
    kind = ALIASES.get(m[1], m[1])
    chips = int(m[2]) // 2 if kind == 'v5p' else int(m[2])
    shapes = SHAPES_3D if kind == 'v5p' else SHAPES_2D
    if chips not in shapes:
      raise ValueError(f'{name}: no standard {kind} slice of {chips} chips; give the shape, '
                       f'e.g. {kind}:{next(iter(shapes.values()))}')
    return kind, f'{kind}:{shapes[chips]}', 0
  if m := re.fullmatch(r'(h100|h200|a100):(\d+)x(\d+)', name):
    nodes, per_node = int(m[2]), int(m[3])
    n = nodes * per_node
    if n not in SHAPES_3D:
      raise ValueError(f'{name}: {n} GPUs; the estimate compiles for a TPU v5p slice of as many '
                       f'chips, which exists for {sorted(SHAPES_3D)}')
    return m[1], f'v5p:{SHAPES_3D[n]}', nodes
  raise ValueError(f'unknown topology {name!r}; expected one of the forms {FORMS}')


def tpu_devices(topology: str) -> list[jax.Device]:
  """Compile-only devices of a libtpu topology name (no TPU needed; libtpu must be installed)."""
  if importlib.util.find_spec('libtpu') is None:
    raise RuntimeError(f'compiling for {topology} needs libtpu: pip install "sam-jax[tpu]" '
                       '(any machine; no TPU needed)')
  # Compile-only: libtpu must not take the machine's TPU lock (/tmp/libtpu_lockfile), which any
  # other jax process that probed for a TPU may hold.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(platform='tpu', topology_name=topology).devices)
  except jax.errors.JaxRuntimeError as e:
    raise ValueError(f'libtpu rejects the topology {topology!r}: {e}') from None


def get_target(name: str) -> Target:
  """The compile target for a name of the forms in ``FORMS``."""
  kind, topology, processes = parse(name)
  devices = tpu_devices(topology)
  estimate = ''
  if kind in ('h100', 'h200', 'a100'):
    estimate = (f'GPU estimate: compiled for {topology} (as many TPU v5p chips, same mesh); '
                'arguments and outputs exact, temporaries from the TPU compiler')
  return Target(name, topology, CHIPS[kind], devices,
                processes or len({d.process_index for d in devices}), estimate)


def local_target() -> Target:
  """This job's own devices (exact): memory from the device, when it reports it."""
  devices = jax.devices()
  stats = devices[0].memory_stats() or {}
  chip = None
  if 'bytes_limit' in stats:
    from sam_jax.training import metrics
    chip = Chip(devices[0].device_kind, int(stats['bytes_limit']),
                metrics.peak_flops(devices[0]))
  return Target('this machine', 'this machine', chip, devices, jax.process_count())
