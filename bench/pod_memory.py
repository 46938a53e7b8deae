"""Compiled memory per chip of the paper's runs on the slices of POD_LAYOUTS (the README table),
from shapes alone on any CPU machine with the tpu extra (libtpu's compile-only client).

  .venv/bin/python bench/pod_memory.py            # every row: ~5 min each on 2 cores, 40 min in all
  .venv/bin/python bench/pod_memory.py --only vit_b/v5e-64

Each row is ``train.py --config=configs/sam_<model>.py:<slice> --compile_only --topology=...``.
Besides the shipped layouts: vit_b with 2 microbatches or with 16 masks a chip per decoder pass,
vit_h with fsdp 4, the vit_h program read as 64 H100s (an estimate, see
sam_jax/training/topology.py) and vit_h at 1 image x 64 masks per chip, to set against the H100's
measured 17 GiB peak for that batch (README, round remat). Prints a markdown table last and writes
JSON (one report per row) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import jax  # noqa: E402

jax.config.update('jax_platforms', 'cpu')  # the targets' devices come from libtpu

from sam_jax.training import compile_only, topology  # noqa: E402
from sam_jax.training.config import paper_config  # noqa: E402

# name: (model, config arg, topology, overrides)
ROWS = {
    'vit_h/v5p-128': ('vit_h', 'v5p-128', 'v5p-128', {}),
    'vit_h/v5p-256': ('vit_h', 'v5p-256', 'v5p-256', {}),
    'vit_b/v5e-64': ('vit_b', 'v5e-64', 'v5e-64', {}),
    'vit_b/v5e-64 microbatches 2': ('vit_b', 'v5e-64', 'v5e-64', {'microbatches': 2}),
    'vit_b/v5e-64 mask chunks': ('vit_b', 'v5e-64', 'v5e-64', {'decoder_mask_chunk': 1024}),
    'vit_h/v5p-128 fsdp 4': ('vit_h', 'v5p-128', 'v5p-128', {'mesh.fsdp': 4}),
    'vit_h/h100:8x8': ('vit_h', 'v5p-128', 'h100:8x8', {}),
    'vit_h/1-image-per-chip': ('vit_h', '', 'v5p:2x2x1', {'global_batch_size': 4}),
}


def print_table(results: dict[str, dict]) -> None:
  """The README's table of the reports."""
  print('\n| run | slice | mesh (data x fsdp) | microbatches | arguments | outputs - aliased | '
        'temporaries | total / HBM (GiB) | fits | TFLOP per step |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for name, r in results.items():
    row = compile_only.summary_row(r)
    mesh = f'{r["mesh"]["data"]} x {r["mesh"]["fsdp"]}'
    if 'memory' in r:
      print(f'| {name} | {r["topology"]} ({r["devices"]} chips) | {mesh} | {r["microbatches"]} | '
            f'{row["argument"]} | {row["output"] - row["alias"]:.2f} | {row["temp"]} | '
            f'{row["total"]} / {row["hbm"]} | {"yes" if row["fits"] else "NO"} | '
            f'{row["tflops_per_step"]} |')
    else:
      print(f'| {name} | {r["topology"]} | {mesh} | {r["microbatches"]} | | | | '
            f'{r["compiler_error"]} | NO | {row["tflops_per_step"]} |')


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--only', nargs='*', default=None, help=f'rows of {list(ROWS)}')
  p.add_argument('--out', default='bench/results/pod_memory.json')
  args = p.parse_args(argv)
  names = args.only or list(ROWS)
  unknown = set(names) - set(ROWS)
  if unknown:
    p.error(f'unknown rows {sorted(unknown)}; choose from {list(ROWS)}')
  results = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      results = json.load(f)
  for name in names:
    model, arg, topo, overrides = ROWS[name]
    config = paper_config(model, arg)
    for key, value in overrides.items():  # 'mesh.fsdp' sets config.mesh.fsdp
      *parents, leaf = key.split('.')
      node = config
      for p in parents:
        node = node[p]
      node[leaf] = value
    t0 = time.perf_counter()
    report = compile_only.compile_report(config, topology.get_target(topo))
    print(f'\n== {name} ({time.perf_counter() - t0:.0f} s)\n{compile_only.format_report(report)}',
          flush=True)
    results[name] = report
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1, default=str)
  print_table(results)
  return 0


if __name__ == '__main__':
  sys.exit(main())
