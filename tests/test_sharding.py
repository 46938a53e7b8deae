"""The model sharded over an 8-device CPU mesh (data x fsdp x tensor = 2 x 2 x 2) gives the same
outputs as on one device. Runs in a subprocess: the device count is fixed when jax starts."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np


def check_sharded_forward() -> None:
  import jax
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  from sam_jax import sam_model_registry
  from sam_jax.predictor import assemble_prompts
  from sam_jax.sharding import logical_to_spec, make_mesh, shard_state, state_shardings

  assert len(jax.devices()) == 8
  sam = sam_model_registry['vit_tiny'](seed=0)
  cfg = sam.config
  graphdef, state = nnx.split(sam)
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  specs = jax.tree.leaves(state_shardings(state, mesh))
  assert any('tensor' in str(s.spec) for s in specs) and any('fsdp' in str(s.spec) for s in specs)
  assert logical_to_spec(('embed', 'mlp'), (96, 384), mesh) == P('fsdp', 'tensor')
  assert logical_to_spec(('embed', 'mlp'), (95, 384), mesh) == P(None, 'tensor')  # 95 % 2 != 0

  rng = np.random.default_rng(0)
  images = rng.standard_normal((4, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  coords, labels = assemble_prompts(rng.uniform(0, 256, (4, 2, 2)), np.ones((4, 2)), None, 4)
  masks = np.zeros((4, cfg.low_res_size, cfg.low_res_size), np.float32)

  def forward(state, images, coords, labels):
    model = nnx.merge(graphdef, state)
    emb = model.embed_images(images)
    return model.decode(emb, coords, labels, masks, multimask_output=True)

  expected = jax.jit(forward)(state, images, coords, labels)
  batch = NamedSharding(mesh, P(('data', 'fsdp')))
  sharded = jax.jit(forward)(shard_state(state, mesh), jax.device_put(images, batch),
                             jax.device_put(coords, batch), jax.device_put(labels, batch))
  assert sharded[0].sharding.spec[0] is not None  # outputs stay batch-sharded
  for a, b in zip(sharded, expected):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  print('sharded forward ok')


def test_sharded_forward_on_8_cpu_devices():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  code = 'import test_sharding; test_sharding.check_sharded_forward()'
  result = subprocess.run([sys.executable, '-c', code], env=env, cwd=os.path.dirname(__file__),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert 'sharded forward ok' in result.stdout
