"""Ahead-of-time compile of the train step for a pod, from shapes alone: does it fit, and how.

  python train.py --config=configs/sam_vit_h.py:v5p-128 --compile_only --topology=v5p-128

``loop.setup`` builds the same mesh, abstract state, shardings and jitted step as a real run, over
compile-only devices of the target (``topology.py``); nothing is materialised. The compiled step's
``memory_analysis()`` gives the bytes per chip; a program that exceeds the chip's HBM fails to
compile on TPU, and that is reported as "does not fit" with the compiler's figures.
"""
from __future__ import annotations

import math
import time
from typing import Any

import jax
import ml_collections

from sam_jax.training import loop
from sam_jax.training.topology import CHIPS, GiB, Target

MEMORY_FIELDS = ('argument', 'output', 'alias', 'temp', 'generated_code')


def out_of_memory(error: Exception) -> bool:
  return 'RESOURCE_EXHAUSTED' in str(error) or 'Ran out of memory' in str(error)


def sharding_summary(tree) -> dict[str, Any]:
  """Arrays, bytes and bytes per device of a tree of sharded ShapeDtypeStructs, grouped by the
  mesh axes each array is split over ('replicated' for none)."""
  groups: dict[str, list[float]] = {}
  total = per_device = 0
  for leaf in jax.tree.leaves(tree):
    size = math.prod(leaf.shape) * leaf.dtype.itemsize
    shard = math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    mesh = leaf.sharding.mesh
    axes = sorted({a for entry in leaf.sharding.spec if entry
                   for a in ((entry,) if isinstance(entry, str) else entry) if mesh.shape[a] > 1})
    g = groups.setdefault('+'.join(axes) or 'replicated', [0, 0, 0])
    g[0] += 1
    g[1] += size
    g[2] += shard
    total += size
    per_device += shard
  return {'arrays': sum(g[0] for g in groups.values()), 'bytes': total,
          'bytes_per_device': per_device,
          'by_axes': {k: {'arrays': v[0], 'bytes': v[1], 'bytes_per_device': v[2]}
                      for k, v in sorted(groups.items())}}


def lower(config: ml_collections.ConfigDict, target: Target):
  """(lowered train step, report so far): the mesh, shardings and step of a real run over the
  target's devices, traced from shapes (Python: in the calling thread)."""
  mesh = loop.make_mesh(config, devices=target.devices)
  t = loop.setup(config, mesh, num_processes=target.num_processes)
  b, m = t.batch_spec['mask_valid'].shape
  flops = loop.model_flops_per_step(t)
  report: dict[str, Any] = {
      'model': config.model, 'topology': target.name, 'compiled_for': target.topology,
      'chip': target.chip.name if target.chip else target.devices[0].device_kind,
      'devices': target.num_devices, 'processes': target.num_processes,
      'mesh': dict(mesh.shape), 'global_batch': b, 'masks_per_image': m,
      'rounds': config.num_rounds, 'microbatches': config.get('microbatches', 1),
      'remat': config.remat, 'attention': t.model_config.attention,
      'round_remat': config.round_remat, 'dtype': config.model_dtype,
      'trainable': config.trainable, 'estimate': target.estimate,
      'params': sharding_summary(t.abstract_state['params']),
      'opt_state': sharding_summary(t.abstract_state['opt_state']),
      'frozen': sharding_summary(t.abstract_state['frozen']),
      'batch_bytes_per_device': sharding_summary(t.batch_spec)['bytes_per_device'],
      'hbm_bytes': target.chip.hbm_bytes if target.chip else None,
      'model_flops_per_step': flops, 'model_flops_per_device': flops / target.num_devices,
  }
  if target.chip:
    report['seconds_at_peak'] = flops / target.num_devices / target.chip.peak_flops
  return t.lower_step(), report


def compile_lowered(lowered, report: dict[str, Any]) -> dict[str, Any]:
  """Compiles (XLA: any thread) and adds the memory per chip, or the compiler's out-of-memory
  error, to ``report``."""
  hbm = report['hbm_bytes']
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if not out_of_memory(e):
      raise
    # A GPU estimate compiles for v5p chips: past their HBM it only knows "more than that".
    fits = None if report['estimate'] and hbm > CHIPS['v5p'].hbm_bytes else False
    return dict(report, fits=fits, compile_s=time.perf_counter() - t0,
                compiler_error=str(e).strip().splitlines()[0])
  report = dict(report, compile_s=time.perf_counter() - t0, fits=None)
  mem = compiled.memory_analysis()
  if mem is not None:
    figures = {f: int(getattr(mem, f'{f}_size_in_bytes')) for f in MEMORY_FIELDS}
    figures['total'] = (figures['argument'] + figures['output'] - figures['alias']
                        + figures['temp'] + figures['generated_code'])
    report.update(memory=figures, fits=None if hbm is None else figures['total'] <= hbm)
  return report


def compile_report(config: ml_collections.ConfigDict, target: Target) -> dict[str, Any]:
  """Compiles ``config``'s train step for ``target``; returns the figures (see ``format_report``)."""
  return compile_lowered(*lower(config, target))


def compile_reports(jobs: list[tuple[ml_collections.ConfigDict, Target]], threads: int = 2
                    ) -> list[dict[str, Any]]:
  """``compile_report`` of several (config, target): traced one after another, compiled in
  ``threads`` threads (XLA's compiler runs outside the GIL; each compile is mostly serial)."""
  from concurrent.futures import ThreadPoolExecutor
  lowered = [lower(config, target) for config, target in jobs]
  with ThreadPoolExecutor(threads) as pool:
    return list(pool.map(lambda a: compile_lowered(*a), lowered))


def gib(n: float) -> str:
  return f'{n / GiB:.2f} GiB'


def format_report(r: dict[str, Any]) -> str:
  """The report as printed by ``train.py --compile_only``."""
  mesh = ' x '.join(f'{k} {v}' for k, v in r['mesh'].items())
  lines = [
      f'train step of {r["model"]} ({r["dtype"]}, trainable {r["trainable"]}) for {r["topology"]}'
      + (f' (compiled for {r["compiled_for"]})' if r['compiled_for'] != r['topology'] else '')
      + f': {r["devices"]} x {r["chip"]}, {r["processes"]} process(es)',
      f'  mesh {mesh}; global batch {r["global_batch"]} images x {r["masks_per_image"]} masks x '
      f'{r["rounds"]} rounds in {r["microbatches"]} microbatch(es); attention {r["attention"]}, '
      f'remat {r["remat"]}, round remat {r["round_remat"]}',
  ]
  if r['estimate']:
    lines.append(f'  ** {r["estimate"]} **')
  hbm = r['hbm_bytes']
  lines.append('per chip:')
  if 'memory' in r:
    mem = r['memory']
    for name, key in (('arguments', 'argument'), ('outputs', 'output'),
                      ('aliased (donated)', 'alias'), ('temporaries', 'temp'),
                      ('generated code', 'generated_code')):
      sign = '-' if key == 'alias' else ' '
      lines.append(f'  {name:<20}{sign}{gib(mem[key]):>12}')
    verdict = ('fits' if r['fits'] else 'DOES NOT FIT') if r['fits'] is not None else 'HBM unknown'
    of = f' of {gib(hbm)} HBM ({mem["total"] / hbm:.0%})' if hbm else ''
    lines.append(f'  {"total":<20} {gib(mem["total"]):>12}{of}: {verdict}')
  elif r['fits'] is None:
    lines.append(f'  NO ESTIMATE: more than a TPU v5p chip holds ({r["compiler_error"]})')
  else:
    lines.append(f'  DOES NOT FIT in {gib(hbm) if hbm else "the HBM"}: {r["compiler_error"]}')
  lines.append(f'model FLOPs per step {r["model_flops_per_step"]:.3e}, per chip '
               f'{r["model_flops_per_device"]:.3e}'
               + (f' ({r["seconds_at_peak"]:.2f} s at the bf16 peak)'
                  if 'seconds_at_peak' in r else ''))
  for name in ('params', 'opt_state', 'frozen'):
    s = r[name]
    if not s['arrays']:
      continue
    parts = ', '.join(f'{v["arrays"]} {"" if k == "replicated" else "over "}{k} '
                      f'({gib(v["bytes"])})' for k, v in s['by_axes'].items())
    lines.append(f'{name:<9} {gib(s["bytes"])} total, {gib(s["bytes_per_device"])} per chip; '
                 f'{s["arrays"]} arrays: {parts}')
  lines.append(f'batch     {gib(r["batch_bytes_per_device"])} per chip; compiled in '
               f'{r["compile_s"]:.0f} s')
  return '\n'.join(lines)


def summary_row(r: dict[str, Any]) -> dict[str, Any]:
  """The figures of a README table row, in GiB."""
  mem = r.get('memory', {})
  row = {k: round(v / GiB, 2) for k, v in mem.items()}
  row.update(hbm=round(r['hbm_bytes'] / GiB, 2) if r['hbm_bytes'] else None, fits=r['fits'],
             tflops_per_step=round(r['model_flops_per_step'] / 1e12, 1))
  return row


def main(config: ml_collections.ConfigDict, target: Target, workdir: str | None = None) -> int:
  """Prints the report (and writes it to ``workdir``/compile_report.json); returns 0 if it fits
  (or the HBM is unknown), 1 if it does not."""
  import json
  report = compile_report(config, target)
  print(format_report(report))
  if workdir:
    from sam_jax.training.checkpointing import as_path
    path = as_path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / 'compile_report.json').write_text(json.dumps(report, indent=1, default=str))
  return 0 if report['fits'] is not False else 1
