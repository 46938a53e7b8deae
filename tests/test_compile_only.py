"""Ahead-of-time compile of the train step for TPU topologies on this CPU (libtpu's compile-only
client, the tpu extra), pod-scale config knobs (global batch, microbatches), config values out of
range, topology names.

The compiled step is vit_tiny's on v5p:2x2x1 (4 chips), once with the parameters replicated
(data 4) and once split over fsdp 4: memory figures come back and every chip's arguments shrink.
Each compile takes ~50 s here (libtpu's compiler, one core each), so the two run side by side
and are shared by the tests.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str = ''):
  """``configs/NAME``'s ``get_config(arg)``, as ``--config=configs/NAME:arg`` reads it."""
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(ROOT, 'configs', name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_config(**overrides):
  c = load_config('tiny.py', 'smoke')
  c.data.batch_size = 4
  c.data.max_masks = 2
  c.num_rounds = 2
  for key, value in overrides.items():  # 'mesh__fsdp' sets c.mesh.fsdp
    *parents, leaf = key.split('__')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


# --- topology names -------------------------------------------------------------------------


@pytest.mark.parametrize('name, expected', [
    ('v5p:4x4x4', ('v5p', 'v5p:4x4x4', 0)),
    ('v5p-128', ('v5p', 'v5p:4x4x4', 0)),       # 128 TensorCores = 64 chips
    ('v5p-256', ('v5p', 'v5p:4x4x8', 0)),
    ('v5litepod-64', ('v5e', 'v5e:8x8', 0)),
    ('v5e-64', ('v5e', 'v5e:8x8', 0)),
    ('V6E-16', ('v6e', 'v6e:4x4', 0)),
    ('h100:16x8', ('h100', 'v5p:4x4x8', 16)),   # estimate: as many v5p chips
])
def test_topology_names(name, expected):
  from sam_jax.training import topology
  assert topology.parse(name) == expected


@pytest.mark.parametrize('name, message', [
    ('v9x:2x2', 'unknown topology'), ('v5p-100', 'no standard v5p slice'),
    ('h100:3x8', 'exists for'), ('', 'unknown topology')])
def test_bad_topology_names(name, message):
  from sam_jax.training import topology
  with pytest.raises(ValueError, match=message):
    topology.parse(name)


def test_pod_devices_and_hosts():
  from sam_jax.training import topology
  t = topology.get_target('v5p-128')
  assert (t.num_devices, t.num_processes, t.chip.name) == (64, 16, 'TPU v5p')
  assert {d.platform for d in t.devices} == {'tpu'}
  gpu = topology.get_target('h100:2x8')
  assert (gpu.num_devices, gpu.num_processes) == (16, 2) and 'estimate' in gpu.estimate
  with pytest.raises(ValueError, match='libtpu rejects'):
    topology.tpu_devices('v5p:3x3x3')


# --- pod-scale config knobs -----------------------------------------------------------------


def test_global_batch_is_shared_among_processes():
  from sam_jax.training import loop
  c = tiny_config(global_batch_size=256)
  assert loop.input_config(c, num_processes=16).batch_size == 16
  assert loop.input_config(c, num_processes=32).batch_size == 8
  assert loop.input_config(tiny_config(), num_processes=16).batch_size == 4  # per process
  with pytest.raises(ValueError, match='not divisible by the 3 processes'):
    loop.input_config(c, num_processes=3)


def test_microbatches_must_split_over_the_batch_axes():
  from sam_jax.training import loop
  mesh = types.SimpleNamespace(shape={'data': 4, 'fsdp': 2, 'tensor': 1})
  loop.check_batch(64, tiny_config(microbatches=8), mesh)  # 8 images per microbatch, 1 a device
  with pytest.raises(ValueError, match='multiple of 8'):
    loop.check_batch(64, tiny_config(microbatches=16), mesh)
  with pytest.raises(ValueError, match='does not split'):
    loop.check_batch(12, tiny_config(), mesh)


def test_config_values_out_of_range_are_named_before_anything_is_built():
  from sam_jax.training import config as train_config, loop
  from sam_jax.training.config import POD_LAYOUTS
  for key, value, message in [
      ('num_rounds', 0, r'config\.num_rounds=0 \(at least 1\)'),
      ('data__batch_size', 0, r'config\.data\.batch_size=0 \(at least 1\)'),
      ('on_nonfinite', 'Stop', r"config\.on_nonfinite='Stop' \(one of \('stop', 'skip'\)\)"),
      ('decoder_dropout', 1.0, r'config\.decoder_dropout=1\.0 \(from 0 to below 1\)'),
      ('optimizer__decay_steps', (5, 3), r'config\.optimizer\.decay_steps=\(5, 3\)'),
  ]:
    with pytest.raises(ValueError, match=message):
      loop.setup(tiny_config(**{key: value}))
  # every shipped config passes
  configs = [('tiny.py', a) for a in ('', 'smoke')] + [('finetune_coco.py', 'vit_h,mydata')]
  configs += [(f'sam_{m}.py', a) for m in ('vit_b', 'vit_l', 'vit_h') for a in ('', 'cpu')]
  configs += [(f'sam_{m}.py', pod) for m, pod in POD_LAYOUTS]
  for name, arg in configs:
    train_config.check(load_config(name, arg))


def check_microbatches(devices: int) -> None:
  """One step of the tiny config on ``devices`` CPU devices (batch over data): 2 microbatches
  give the loss and parameters of 1. One prompt round and no dropout, so the step has no random
  draw that depends on the batch size."""
  from bench.train_step import synthetic_batch
  from sam_jax.training import loop
  assert jax.device_count() == devices
  runs = []
  for k in (1, 2):
    c = tiny_config(microbatches=k, num_rounds=1, data__batch_size=4, data__max_masks=3,
                    trainable='decoder')  # (compiles in half the time of 'all')
    c.optimizer.warmup_steps = 0
    t = loop.setup(c)
    runs.append((t, t.lower_step()))
  with ThreadPoolExecutor(2) as pool:  # the two compiles side by side
    steps = list(pool.map(lambda run: run[1].compile(), runs))
  results = []
  for (t, _), step in zip(runs, steps):
    batch = synthetic_batch(t.batch_spec, seed=1)
    batch['mask_valid'][1, 1:] = False   # valid masks differ between microbatches: the loss
    batch['mask_valid'][2, 2] = False    # divides by the whole batch's count
    state, metrics = step(t.init_state(), loop.global_batch(batch, t.batch_shardings))
    results.append((float(metrics['loss']), float(metrics['grad_norm']),
                    [np.asarray(x) for x in jax.tree.leaves(state['params'])]))
  (loss1, norm1, params1), (loss2, norm2, params2) = results
  print(f'loss {loss1} / {loss2}, grad norm {norm1} / {norm2}')
  np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
  np.testing.assert_allclose(norm2, norm1, rtol=1e-5)
  # Adam's first update is ~lr * sign(gradient) (lr 2e-3): rounding moves only elements whose
  # gradient is near zero, by less than lr (measured: 1.5e-4 at most, 2 of ~800k elements
  # beyond 1e-5 with trainable=all, 475 of 193k (0.25%) with decoder); a wrongly summed gradient moves many elements by ~lr.
  off = sum(int((np.abs(a - b) > 1e-5).sum()) for a, b in zip(params2, params1))
  assert off <= 0.01 * sum(a.size for a in params1), off
  for a, b in zip(params2, params1):
    np.testing.assert_allclose(a, b, rtol=0, atol=5e-4)
  print('microbatches ok')


def test_microbatches_give_the_full_batch_step():
  flags = '--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0'
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  code = 'import test_compile_only as t; t.check_microbatches(2)'
  result = subprocess.run([sys.executable, '-c', code], env=env, cwd=os.path.dirname(__file__),
                          capture_output=True, text=True, timeout=600)
  print(result.stdout[-2000:])
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  assert 'microbatches ok' in result.stdout


# --- compiling for a TPU topology -----------------------------------------------------------


@pytest.fixture(scope='module')
def reports():
  """Compile reports of the tiny step on v5p:2x2x1: parameters replicated, and split over fsdp."""
  from sam_jax.training import compile_only, topology
  target = topology.get_target('v5p:2x2x1')
  meshes = (1, 4)
  return dict(zip(meshes, compile_only.compile_reports(
      [(tiny_config(mesh__data=4 // fsdp, mesh__fsdp=fsdp), target) for fsdp in meshes])))


def test_compiled_memory_per_chip(reports):
  from sam_jax.training import compile_only
  r = reports[4]
  mem = r['memory']
  assert r['fits'] is True and r['devices'] == 4 and r['mesh'] == {'data': 1, 'fsdp': 4,
                                                                    'tensor': 1}
  for key in ('argument', 'output', 'temp', 'generated_code'):
    assert mem[key] > 0, key
  assert mem['alias'] > 0  # the donated state is updated in place
  assert mem['total'] == (mem['argument'] + mem['output'] - mem['alias'] + mem['temp']
                          + mem['generated_code'])
  assert mem['total'] < r['hbm_bytes']
  # 'auto' attention is resolved for the target (attention.ahead_of_time), not left to the host
  assert r['attention'] == 'chunked'
  # The compiled step's arguments are the state and the batch, as the shardings say, plus the
  # padding of TPU layouts (tiles of 8 x 128: large for vit_tiny's small arrays).
  expected = (r['params']['bytes_per_device'] + r['opt_state']['bytes_per_device']
              + r['frozen']['bytes_per_device'] + r['batch_bytes_per_device'])
  print(f'arguments per chip {mem["argument"]}, state and batch {expected}')
  assert expected <= mem['argument'] <= 2.5 * expected, (expected, mem['argument'])
  assert r['model_flops_per_step'] > 1e9
  assert reports[1]['model_flops_per_step'] == r['model_flops_per_step']
  text = compile_only.format_report(r)
  assert 'fits' in text and 'DOES NOT FIT' not in text and 'over fsdp' in text
  print(text)


def test_fsdp_shrinks_every_chips_arguments(reports):
  replicated, split = reports[1], reports[4]
  assert replicated['params']['by_axes'].keys() == {'replicated'}
  p = split['params']
  assert p['by_axes']['fsdp']['bytes_per_device'] * 4 == p['by_axes']['fsdp']['bytes']
  # The rules split every array with an 'embed' axis (88% of vit_tiny's bytes; the rest are
  # biases, norms and the decoder's small tables): a chip holds ~1/3 of the state.
  assert p['by_axes']['fsdp']['bytes'] > 0.8 * p['bytes']
  assert p['bytes_per_device'] < 0.4 * replicated['params']['bytes_per_device']
  assert split['opt_state']['bytes_per_device'] < 0.4 * replicated['opt_state']['bytes_per_device']
  # The batch is split 4 ways in both (data x fsdp), so the compiled arguments shrink by the
  # parameters and optimizer state saved.
  saved = (replicated['params']['bytes_per_device'] - p['bytes_per_device']
           + replicated['opt_state']['bytes_per_device'] - split['opt_state']['bytes_per_device'])
  shrink = replicated['memory']['argument'] - split['memory']['argument']
  print(f'arguments per chip: {replicated["memory"]["argument"]} (data 4) -> '
        f'{split["memory"]["argument"]} (fsdp 4); state saved {saved}')
  assert 0.9 * saved <= shrink <= 1.1 * saved  # measured: 6266880 of 6269688 bytes


def test_out_of_memory_is_reported_not_raised(monkeypatch):
  """The compiler's own error for a program over a v5e chip's HBM is recognised, and the report
  says the config does not fit instead of raising."""
  import jax.numpy as jnp

  from sam_jax.training import compile_only, loop, topology
  target = topology.get_target('v5e:2x2')
  big = jax.ShapeDtypeStruct((2**16, 2**16), jnp.float32,  # 16 GiB > v5e's 15.75 GiB
                             sharding=jax.sharding.SingleDeviceSharding(target.devices[0]))
  with pytest.raises(jax.errors.JaxRuntimeError) as info:
    jax.jit(lambda x: x @ x + 1).lower(big).compile()
  assert compile_only.out_of_memory(info.value), str(info.value)

  class Lowered:
    def compile(self):
      raise info.value

  monkeypatch.setattr(loop.Training, 'lower_step', lambda self: Lowered())
  r = compile_only.compile_report(tiny_config(mesh__data=4), target)
  assert r['fits'] is False and 'exceeds available HBM' in r['compiler_error']
  assert 'DOES NOT FIT in 15.75 GiB' in compile_only.format_report(r)
  # A GPU estimate compiles for v5p chips (95.74 GiB): past that an H100 (79 GiB) does not fit,
  # an H200 (140 GiB) is unknown.
  r = compile_only.compile_report(tiny_config(mesh__data=4), topology.get_target('h200:1x4'))
  assert r['fits'] is None and 'NO ESTIMATE' in compile_only.format_report(r)


def test_cli_rejects_an_unknown_topology():
  result = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/tiny.py', '--compile_only',
       '--topology=v9x-8'], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "unknown topology 'v9x-8'" in result.stderr


def test_cli_says_a_users_mistake_in_one_line(tmp_path):
  """train.py and eval.py print a bad config value or a missing checkpoint as `error: ...` with
  exit status 2, not as a traceback."""
  runs = [
      (['train.py', '--config=configs/tiny.py:smoke', f'--workdir={tmp_path}/train',
        '--config.num_rounds=0'], 'config.num_rounds=0 (at least 1)'),
      (['train.py', '--config=configs/tiny.py:smoke', f'--workdir={tmp_path}/train',
        '--config.model=vit_q'], "config.model 'vit_q': choose one of"),
      (['eval.py', '--config=configs/eval/synthetic.py:smoke', f'--workdir={tmp_path}/eval',
        f'--config.checkpoint={tmp_path}/absent'], f'checkpoint {tmp_path}/absent does not exist'),
      (['eval.py', '--config=configs/eval/synthetic.py:smoke', f'--workdir={tmp_path}/eval',
        '--config.single_point.num_points=0'], 'config.single_point: num_points'),
  ]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  for args, message in runs:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 2, (args, result.stderr[-2000:])
    assert 'Traceback' not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and message in last, result.stderr[-2000:]
