"""``eval.py`` split over devices and hosts gives the figures of one device.

The same evaluation (random vit_tiny, 5 synthetic images; the single point protocol with both
first-click variants, and object proposals from a 4x4 grid) runs as 1 process with 1 CPU device,
1 process with 2 devices (one thread and one model copy per device) and 2 processes with 1 device
each (``jax.distributed`` on 127.0.0.1; process 0 gathers and writes). Every mask's clicks and
IoUs, and every figure, must agree, and only process 0 writes.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest

from test_train_multihost import CLUSTER_ENV, REPO, free_port, run_together

IMAGES = 5


def eval_command(workdir, *extra: str) -> list[str]:
  return [sys.executable, str(REPO / 'eval.py'), '--config=configs/eval/synthetic.py:smoke',
          f'--workdir={workdir}', '--config.datasets=synthetic_shapes/par:validation',
          f'--config.max_images={IMAGES}', '--config.protocols=single_point,proposals',
          '--config.single_point.batch_size=4', '--config.proposals.points_per_side=4',
          '--config.progress=False', *extra]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  from sam_jax.data import build
  root = tmp_path_factory.mktemp('eval_parallel')
  data_dir = root / 'tfds'
  build.build('synthetic_shapes', str(data_dir), config='par', image_size=64, num_train=1,
              num_validation=IMAGES, seed=4)
  env = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV}
  env.update(TFDS_DATA_DIR=str(data_dir), JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_backend_optimization_level=0')  # compiles ~3x faster on CPU
  multi = [f'--coordinator_address=127.0.0.1:{free_port()}', '--num_processes=2']
  commands = {
      'one': eval_command(root / 'one'),
      'devices': eval_command(root / 'devices', '--local_device_count=2'),
      'process0': eval_command(root / 'hosts', *multi, '--process_id=0'),
      'process1': eval_command(root / 'hosts', *multi, '--process_id=1'),
  }
  t0 = time.perf_counter()
  results = run_together(commands, env, root)
  print(f'4 evaluation processes in {time.perf_counter() - t0:.0f} s')
  for name, (rc, out) in results.items():
    assert rc == 0, f'{name} exited with {rc}:\n{out[-5000:]}'
  return root, results


def test_devices_and_hosts_give_the_figures_of_one_device(runs):
  root, results = runs
  want = json.loads((root / 'one' / 'results.json').read_text())
  key = 'synthetic_shapes/par:validation'
  assert want['single_point'][key]['images'] == IMAGES
  assert want['proposals'][key]['images'] == IMAGES
  for run in ('devices', 'hosts'):
    got = json.loads((root / run / 'results.json').read_text())
    for variant in ('center', 'random'):
      a = want['single_point'][key]['variants'][variant]
      b = got['single_point'][key]['variants'][variant]
      assert [(m['record'], m['mask'], m['clicks']) for m in b['masks']] == \
          [(m['record'], m['mask'], m['clicks']) for m in a['masks']], (run, variant)
      np.testing.assert_allclose([m['iou'] for m in b['masks']], [m['iou'] for m in a['masks']],
                                 atol=1e-5)
      assert b['miou'].keys() == a['miou'].keys()
      np.testing.assert_allclose(list(b['miou'].values()), list(a['miou'].values()), atol=1e-6)
    pa, pb = want['proposals'][key], got['proposals'][key]
    assert (pb['images'], pb['results']) == (pa['images'], pa['results']), run
    for k, v in pa['metrics'].items():
      assert (v is None and pb['metrics'][k] is None) or abs(pb['metrics'][k] - v) < 1e-6, k
  out0, out1 = results['process0'][1], results['process1'][1]
  assert '# Single point valid mask evaluation' in out0 and '# Single point' not in out1
  assert 'x 2 local device(s)' in results['devices'][1]
  assert 'on 2 process(es)' in out0
