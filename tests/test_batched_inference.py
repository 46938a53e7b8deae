"""bf16 inference with weights cast once, many images per call, the persistent compilation cache.

vit_tiny with random weights throughout; the bf16 figures are measured on skimage's astronaut.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from flax import nnx

from conftest import PARITY_REPORT
from sam_jax import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
from sam_jax.compilation_cache import default_cache_dir
from sam_jax.modeling.sam import WEIGHT_LAYERS
from sam_jax.predictor import chunk_sizes

ASTRONAUT = skimage.data.astronaut()[:, 64:448]  # (512, 384), non-square


@pytest.fixture(scope='module')
def sam():
  return sam_model_registry['vit_tiny'](seed=0)


@pytest.fixture(scope='module')
def bf16(sam):
  p = SamPredictor(sam, dtype='bfloat16')
  p.set_image(ASTRONAUT)
  return p


# --- bf16 -----------------------------------------------------------------------------------------


def test_bf16_weights_are_cast_once(sam, bf16):
  """The jitted programs receive bf16 weights, and give bit for bit what casting them inside every
  call gives (a model built with bf16 compute and float32 parameters)."""
  p = bf16
  assert p.model.config.dtype == 'bfloat16' and sam.config.dtype == 'float32'
  for _, node in nnx.iter_graph(p.model):
    if isinstance(node, WEIGHT_LAYERS):
      assert node.kernel[...].dtype == jnp.bfloat16
  nbytes = {}
  for leaf in jax.tree.leaves(p.state):  # what the jitted encode / predict take each call
    nbytes[leaf.dtype.name] = nbytes.get(leaf.dtype.name, 0) + leaf.nbytes
  assert nbytes['float32'] < 0.03 * sum(nbytes.values())  # norms, tokens, tables (vit_h: 0.1%)
  per_call = SamPredictor(sam_model_registry['vit_tiny'](seed=0, dtype='bfloat16'))
  point = dict(point_coords=np.array([[200.0, 150.0]]), point_labels=np.array([1]))
  per_call.set_image(ASTRONAUT)
  assert p.features.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(p.features, np.float32),
                                np.asarray(per_call.features, np.float32))
  for a, b in zip(p.predict(**point, return_logits=True),
                  per_call.predict(**point, return_logits=True)):
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, b)


def test_bf16_masks_agree_with_float32(sam, bf16):
  """8 random points on the astronaut: measured 99.70% of mask pixels agree, worst IoU 0.981."""
  f32 = SamPredictor(sam)
  f32.set_image(ASTRONAUT)
  h, w = ASTRONAUT.shape[:2]
  points = np.random.default_rng(0).uniform([0, 0], [w, h], (8, 1, 2))
  same, total, worst = 0, 0, 1.0
  for pt in points:
    a = f32.predict(point_coords=pt, point_labels=np.ones(1))[0]
    b = bf16.predict(point_coords=pt, point_labels=np.ones(1))[0]
    same, total = same + (a == b).sum(), total + a.size
    worst = min(worst, ((a & b).sum((1, 2)) / np.maximum((a | b).sum((1, 2)), 1)).min())
  PARITY_REPORT.append(f'bf16 (weights cast once) vs f32, vit_tiny random weights, astronaut: '
                       f'{same / total:.2%} of mask pixels agree, worst mask IoU {worst:.3f}')
  assert same / total >= 0.99 and worst >= 0.95


# --- many images per call -------------------------------------------------------------------------


def test_chunk_sizes():
  assert chunk_sizes(13, 8) == [8, 4, 1]
  assert chunk_sizes(3, 8) == [2, 1]
  assert chunk_sizes(5, 6) == [4, 1]  # batch_size rounds down to a power of two
  assert chunk_sizes(3, 1) == [1, 1, 1]
  assert chunk_sizes(0, 8) == []


def test_set_images_equals_set_image(sam):
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, shape, np.uint8) for shape in ((120, 200, 3), (300, 90, 3))]
  images.append(ASTRONAUT)
  many, one = SamPredictor(sam), SamPredictor(sam)
  many.set_images(images)  # one encoder call of 2 images, one of 1
  assert many.get_image_embedding().shape == (3, 64, 16, 16)
  assert many.original_sizes == [(120, 200), (300, 90), (512, 384)]
  for i, image in enumerate(images):
    one.set_image(image)
    np.testing.assert_allclose(np.asarray(many.image_features(i)), np.asarray(one.features),
                               atol=1e-5)
    h, w = image.shape[:2]
    prompt = dict(point_coords=np.array([[w / 3, h / 2]]), point_labels=np.array([1]),
                  box=np.array([w / 5, h / 5, w * 0.8, h * 0.9]))
    masks, iou, low = many.predict(**prompt, image_index=i)
    masks1, iou1, low1 = one.predict(**prompt)
    assert masks.shape == (3, h, w)
    np.testing.assert_array_equal(masks, masks1)
    np.testing.assert_allclose(iou, iou1, atol=1e-5)
    np.testing.assert_allclose(low, low1, atol=1e-4)
  with pytest.raises(ValueError, match='image_index 3'):
    many.predict(point_coords=np.array([[1.0, 1.0]]), point_labels=np.array([1]), image_index=3)
  with pytest.raises(ValueError, match='empty'):
    many.set_images([])


def test_generate_batch_equals_generate(sam):
  """Different sizes, a crop layer: the batched crops give each image's records of ``generate``."""
  gen = SamAutomaticMaskGenerator(sam, points_per_side=4, pred_iou_thresh=0.0,
                                  stability_score_thresh=0.0, crop_n_layers=1,
                                  output_mode='uncompressed_rle')
  gen._size_bucket = 64  # as on accelerators: fewer crop sizes to compile
  images = [ASTRONAUT[:200, :150], ASTRONAUT[100:220, 50:300]]
  batched = gen.generate_batch(images)
  assert len(batched) == 2
  for image, records in zip(images, batched):
    single = gen.generate(image)
    assert len(records) == len(single) > 0
    for a, b in zip(records, single):
      assert a['segmentation'] == b['segmentation'] and a['bbox'] == b['bbox']
      assert a['point_coords'] == b['point_coords'] and a['crop_box'] == b['crop_box']
      assert abs(a['predicted_iou'] - b['predicted_iou']) < 1e-5
      assert abs(a['stability_score'] - b['stability_score']) < 1e-5
  assert gen.generate_batch([]) == []


def test_size_buckets_change_no_record_and_share_programs(sam):
  """Accelerators pad crop and image sizes to multiples of 64 (CPU does not: slower there)."""
  kwargs = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                output_mode='uncompressed_rle')
  exact, padded = SamAutomaticMaskGenerator(sam, **kwargs), SamAutomaticMaskGenerator(sam, **kwargs)
  padded._size_bucket = 64
  image = ASTRONAUT[:150, :100]
  a, b = exact.generate(image), padded.generate(image)
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    assert x['segmentation'] == y['segmentation'] and x['bbox'] == y['bbox']
    assert abs(x['stability_score'] - y['stability_score']) < 1e-6
  n = padded.programs.score._cache_size(), padded.programs.masks._cache_size()
  padded.generate(ASTRONAUT[:140, :110])  # the same 192 x 128 bucket
  assert (padded.programs.score._cache_size(), padded.programs.masks._cache_size()) == n


# --- persistent compilation cache -----------------------------------------------------------------

RUN = r'''
import json, sys, time
import jax, jax.monitoring, numpy as np
events = {}
jax.monitoring.register_event_listener(
    lambda name, **kw: events.__setitem__(name, events.get(name, 0) + 1))
from sam_jax import SamAutomaticMaskGenerator
from sam_jax.compilation_cache import enable_compilation_cache
if sys.argv[1] == 'settings':
  off = enable_compilation_cache()  # SAM_JAX_COMPILATION_CACHE=0
  jax.config.update('jax_compilation_cache_dir', sys.argv[2])
  kept = enable_compilation_cache('/elsewhere')
  print(json.dumps(dict(off=off, kept=kept, dir=jax.config.jax_compilation_cache_dir)))
  sys.exit()
# Every program is written (none left out for compiling fast), so that the counts are exact. Random
# weights from numpy: the 59 small programs of a random init would double the test's time.
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
from flax import nnx
from sam_jax import Sam, VARIANTS
rng = np.random.default_rng(0)
graphdef, shapes = nnx.split(nnx.eval_shape(lambda: Sam(VARIANTS['vit_tiny'], rngs=nnx.Rngs(0))))
state = jax.tree.map(lambda a: (rng.standard_normal(a.shape) * 0.1).astype(a.dtype), shapes)
gen = SamAutomaticMaskGenerator(nnx.merge(graphdef, state), points_per_side=4,
                                pred_iou_thresh=0.0, stability_score_thresh=0.0)
t = time.perf_counter()
n = len(gen.generate(np.random.default_rng(0).integers(0, 256, (60, 80, 3), np.uint8)))
print(json.dumps(dict(seconds=time.perf_counter() - t, masks=n,
                      dir=jax.config.jax_compilation_cache_dir,
                      hits=events.get('/jax/compilation_cache/cache_hits', 0),
                      writes=events.get('/jax/compilation_cache/cache_misses', 0))))
'''


def run(args: list[str], cache: str) -> dict:
  env = dict(os.environ, SAM_JAX_COMPILATION_CACHE=cache)
  out = subprocess.run([sys.executable, '-c', RUN, *args], env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(__file__), timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_compilation_cache_serves_a_fresh_process(tmp_path):
  cache = str(tmp_path / 'jax_cache')
  first = run(['generate'], cache)
  entries = sorted(os.listdir(cache))
  second = run(['generate'], cache)
  PARITY_REPORT.append(f'compilation cache, vit_tiny generator, first generate of a fresh process: '
                       f'{first["seconds"]:.2f} s cold ({first["writes"]} programs written), '
                       f'{second["seconds"]:.2f} s warm ({second["hits"]} cache hits)')
  assert first['dir'] == second['dir'] == cache and first['masks'] == second['masks'] > 0
  assert first['writes'] >= 2 and first['hits'] == 0 and len(entries) >= first['writes']
  assert second['hits'] >= first['writes'] and second['writes'] == 0
  assert sorted(os.listdir(cache)) == entries


def test_compilation_cache_settings(tmp_path, monkeypatch):
  out = run(['settings', str(tmp_path / 'mine')], '0')
  assert out == dict(off=None, kept=str(tmp_path / 'mine'), dir=str(tmp_path / 'mine'))
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert default_cache_dir() == tmp_path / 'sam_jax' / 'jax_cache'
  monkeypatch.delenv('XDG_CACHE_HOME')
  assert str(default_cache_dir()).endswith(os.path.join('.cache', 'sam_jax', 'jax_cache'))
