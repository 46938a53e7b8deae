"""Logical axis names -> device-mesh axes, and shardings for model states.

Layers name their parameter axes (``embed``, ``mlp``, ``qkv``, ``head_dim``, ``layers``, ...); which
mesh axis each name is split over is a rule list chosen by the config, never by the model code.
"""
from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sam_jax.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# FSDP over the model width, tensor parallelism over MLP / attention projections; stacked layers
# and small tables replicated. Activations' batch axis goes over data and fsdp.
DEFAULT_RULES: Rules = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('qkv', 'tensor'),
    ('head_dim', None),
    ('layers', None),
    ('sublayers', None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices; -1 takes what the other two leave."""
  devices = list(devices if devices is not None else jax.devices())
  if data == -1:
    data = len(devices) // (fsdp * tensor)
  if data * fsdp * tensor != len(devices):
    raise ConfigError(f'mesh {data}x{fsdp}x{tensor} (data x fsdp x tensor) does not use all '
                      f'{len(devices)} devices')
  # Auto axes: the XLA SPMD partitioner propagates shardings from the inputs (GSPMD).
  return jax.make_mesh((data, fsdp, tensor), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules = DEFAULT_RULES) -> PartitionSpec:
  """The PartitionSpec for an array with these logical axes; a dimension that the mesh axes do
  not divide, or whose mesh axes an earlier dimension already uses, is replicated."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(axes, shape):
    target = table.get(name) if name is not None else None
    names = (target,) if isinstance(target, str) else tuple(target or ())
    n = 1
    for a in names:
      n *= mesh.shape[a]
    if not names or size % n or used & set(names):
      spec.append(None)
      continue
    used |= set(names)
    spec.append(names[0] if len(names) == 1 else names)
  return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """NamedShardings for every variable of ``state`` (same tree), from its ``out_sharding`` names."""
  def one(var):
    axes = var.get_metadata().get('out_sharding') or (None,) * len(var.shape)
    return var.replace(NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh, rules)))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
  """Places ``state`` on the mesh according to its logical axis names."""
  return jax.device_put(state, state_shardings(state, mesh, rules))
