"""Evaluation work split over hosts and over each host's devices.

Every protocol has ``run_images(model, source, items, protocol, *, name, progress, ...)``: the
per-image entries (JSON-serialisable, each with its ``record`` index) of a list of records. Here
the items are dealt round-robin to the processes of the job, then to the local devices (one thread
and one copy of the model each: the devices run concurrently, the host threads wait on them);
the entries of every host are gathered to every host, ordered by record, so that the figures do
not depend on how the work was split.
"""
from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Sequence

import jax
from flax import nnx

from sam_jax import distributed


def on_devices(model, devices: Sequence[jax.Device] | None = None) -> list:
  """One copy of ``model`` per device (default: the local devices), its parameters on it."""
  devices = list(devices or jax.local_devices())
  if len(devices) == 1:
    return [model]
  graphdef, state = nnx.split(model)
  return [nnx.merge(graphdef, jax.device_put(state, d)) for d in devices]


def run_split(run_images: Callable[..., list[dict[str, Any]]], models: Sequence[Any],
              source, items: Sequence[Any], *args, progress: bool = True, **kwargs
              ) -> list[dict[str, Any]]:
  """``run_images(models[d], source, part, *args, progress=..., **kwargs)`` over this host's share
  of ``items`` split between ``models`` (``on_devices``), and the entries of all hosts."""
  mine = list(items)[jax.process_index()::jax.process_count()]
  parts = [mine[d::len(models)] for d in range(len(models))]
  show = progress and jax.process_index() == 0
  with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
    futures = [pool.submit(run_images, m, source, part, *args, progress=show and d == 0, **kwargs)
               for d, (m, part) in enumerate(zip(models, parts))]
    local = [e for f in futures for e in f.result()]
  every = [e for host in distributed.allgather_json(local) for e in host]
  return sorted(every, key=lambda e: e['record'])
