"""sam_jax.training.optimizer against a hand-written numpy AdamW with layer-wise lr decay.

The 'vit_tiny' parameter tree comes from ``nnx.eval_shape`` of ``sam_model_registry['vit_tiny']``
(the same tree as the built model, without the slow random initialisation); the values are numpy
random numbers.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sam_jax import sam_model_registry
from sam_jax.modeling.config import VARIANTS
from sam_jax.training import optimizer
from sam_jax.training.config import default_config

CFG = VARIANTS['vit_tiny']
DEPTH = CFG.encoder_depth
GROUPS, PER_GROUP = CFG.block_groups


@pytest.fixture(scope='module')
def abstract_params():
  sam = nnx.eval_shape(lambda: sam_model_registry['vit_tiny'](seed=0))
  _, params, _ = nnx.split(sam, nnx.Param, ...)
  return params


@pytest.fixture(scope='module')
def params(abstract_params):
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32),
                      abstract_params)


def _names(path):
  names = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
  if names and names[-1] == 'value':
    names = names[:-1]
  return names


def _leaves(tree):
  return [('/'.join(_names(p)), np.asarray(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def _expected_layer_ids(name, shape):
  """The official block numbering, written out element by element."""
  parts = name.split('/')
  if parts[0] != 'image_encoder' or parts[1] == 'neck':
    return np.full(shape, DEPTH + 1.0)
  if parts[1] in ('patch_embed', 'pos_embed'):
    return np.zeros(shape)
  out = np.zeros(shape)
  if parts[1] == 'window_blocks':
    assert shape[:2] == (GROUPS, PER_GROUP - 1)
    for g in range(GROUPS):
      for j in range(PER_GROUP - 1):
        i = PER_GROUP * g + j
        assert i not in CFG.encoder_global_attn_indexes
        out[g, j] = i + 1
    return out
  if parts[1] == 'global_blocks':
    assert shape[0] == GROUPS
    for g in range(GROUPS):
      i = PER_GROUP * g + PER_GROUP - 1
      assert i in CFG.encoder_global_attn_indexes
      out[g] = i + 1
    return out
  raise AssertionError(name)


# ---------------------------------------------------------------------------------------------

def test_learning_rate_schedule():
  f = optimizer.learning_rate_schedule(0.5, 10, (20, 30), 0.1)
  expected = {0: 0.0, 1: 0.05, 5: 0.25, 9: 0.45, 10: 0.5, 11: 0.5, 19: 0.5, 20: 0.05, 25: 0.05,
              29: 0.05, 30: 0.005, 31: 0.005, 1000: 0.005}
  for step, lr in expected.items():
    np.testing.assert_allclose(float(f(step)), lr, rtol=1e-6, atol=1e-9, err_msg=str(step))
  np.testing.assert_allclose(np.asarray(jax.jit(f)(jnp.arange(12))),
                             [0.05 * i for i in range(10)] + [0.5, 0.5], rtol=1e-6, atol=1e-9)
  g = optimizer.learning_rate_schedule(2.0, 0, (3,), 0.5)
  np.testing.assert_allclose([float(g(s)) for s in (0, 2, 3, 9)], [2.0, 2.0, 1.0, 1.0])
  paper = optimizer.learning_rate_schedule(8e-4, 250, (60_000, 86_666))
  np.testing.assert_allclose([float(paper(s)) for s in (125, 250, 59_999, 60_000, 86_666)],
                             [4e-4, 8e-4, 8e-4, 8e-5, 8e-6], rtol=1e-5)


def test_weight_decay_mask(params):
  mask = dict(_leaves(optimizer.weight_decay_mask(params)))
  names = [n for n, _ in _leaves(params)]
  assert set(mask) == set(names)
  for n in names:
    assert bool(mask[n]) == (n.split('/')[-1] == 'kernel'), n
  for n in ['image_encoder/pos_embed',
            'image_encoder/patch_embed/proj/bias',
            'image_encoder/window_blocks/attn/rel_pos_h',
            'image_encoder/window_blocks/attn/rel_pos_w',
            'image_encoder/global_blocks/attn/rel_pos_h',
            'image_encoder/global_blocks/norm1/scale',
            'image_encoder/global_blocks/norm1/bias',
            'image_encoder/neck/1/scale',
            'mask_decoder/iou_token/weight',
            'mask_decoder/mask_tokens/weight',
            'prompt_encoder/no_mask_embed/weight',
            'prompt_encoder/not_a_point_embed/weight',
            'prompt_encoder/point_embeddings/0/weight',
            'mask_decoder/transformer/norm_final_attn/scale']:
    assert n in mask and not mask[n], n
  for n in ['image_encoder/patch_embed/proj/kernel',
            'image_encoder/window_blocks/attn/qkv/kernel',
            'image_encoder/global_blocks/mlp/lin2/kernel',
            'image_encoder/neck/0/kernel',
            'image_encoder/neck/2/kernel',
            'prompt_encoder/mask_downscaling/0/kernel',
            'mask_decoder/transformer/layers/0/self_attn/q_proj/kernel',
            'mask_decoder/output_upscaling/0/kernel']:
    assert n in mask and mask[n], n


def test_layer_ids_and_scales(params):
  ids = dict(_leaves(optimizer.layer_ids(params, CFG)))
  scales = dict(_leaves(optimizer.layer_scales(params, CFG, 0.7)))
  seen_blocks = set()
  for name, x in _leaves(params):
    want = _expected_layer_ids(name, x.shape)
    got = np.broadcast_to(ids[name], x.shape)
    np.testing.assert_array_equal(got, want, err_msg=name)
    np.testing.assert_allclose(np.broadcast_to(scales[name], x.shape), 0.7 ** (DEPTH + 1 - want),
                               rtol=1e-6, err_msg=name)
    if '_blocks/' in name:
      seen_blocks |= set(np.unique(want).astype(int))
  assert seen_blocks == set(range(1, DEPTH + 1))
  np.testing.assert_array_equal(ids['image_encoder/pos_embed'], 0)
  np.testing.assert_array_equal(ids['image_encoder/patch_embed/proj/kernel'], 0)
  np.testing.assert_array_equal(ids['image_encoder/neck/0/kernel'], DEPTH + 1)
  np.testing.assert_array_equal(ids['prompt_encoder/no_mask_embed/weight'], DEPTH + 1)
  np.testing.assert_array_equal(ids['mask_decoder/iou_token/weight'], DEPTH + 1)
  np.testing.assert_allclose(scales['mask_decoder/iou_token/weight'], 1.0)
  np.testing.assert_allclose(scales['image_encoder/pos_embed'], 0.7 ** (DEPTH + 1), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# make_optimizer vs numpy AdamW

def _config(**opt):
  c = default_config()
  c.optimizer.update(dict(learning_rate=0.1, warmup_steps=2, decay_steps=(3,), decay_factor=0.1,
                          b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, layer_decay=0.8,
                          grad_clip_norm=0.0, grad_accum_steps=1))
  c.optimizer.update(opt)
  return c


def _lr(oc, step):
  lr = oc.learning_rate * (step / oc.warmup_steps if step < oc.warmup_steps else 1.0)
  if step >= oc.warmup_steps:
    lr *= oc.decay_factor ** sum(step >= s for s in oc.decay_steps)
  return lr


class NumpyAdamW:
  """Adam (bias-corrected), decoupled weight decay on kernels, x lr(step) x layer scale."""

  def __init__(self, oc, named_params):
    self.oc = oc
    self.p = {n: x.astype(np.float64) for n, x in named_params}
    self.m = {n: np.zeros_like(x) for n, x in self.p.items()}
    self.v = {n: np.zeros_like(x) for n, x in self.p.items()}
    self.scale = {n: oc.layer_decay ** (DEPTH + 1 - _expected_layer_ids(n, x.shape))
                  for n, x in self.p.items()}
    self.step = 0

  def update(self, named_grads):
    oc = self.oc
    g = {n: x.astype(np.float64) for n, x in named_grads}
    if oc.grad_clip_norm:
      norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
      if norm > oc.grad_clip_norm:
        g = {n: x * oc.grad_clip_norm / norm for n, x in g.items()}
    t = self.step + 1
    lr = _lr(oc, self.step)
    for n, gn in g.items():
      self.m[n] = oc.b1 * self.m[n] + (1 - oc.b1) * gn
      self.v[n] = oc.b2 * self.v[n] + (1 - oc.b2) * gn ** 2
      u = (self.m[n] / (1 - oc.b1 ** t)) / (np.sqrt(self.v[n] / (1 - oc.b2 ** t)) + oc.eps)
      if n.split('/')[-1] == 'kernel':
        u = u + oc.weight_decay * self.p[n]
      self.p[n] = self.p[n] - lr * self.scale[n] * u
    self.step += 1


def _grads(params, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(scale=scale, size=x.shape), jnp.float32),
                      params)


def _compare(params, ref, rtol=1e-5, atol=1e-5):
  # atol: float32 rounding (params ~ 1, Adam's bias corrections in float32) stays ~1e-6, while
  # any wrong factor (weight decay 0.1 * lr * p, layer scale, lr, bias correction) is >= 1e-4.
  for n, x in _leaves(params):
    np.testing.assert_allclose(x, ref.p[n], rtol=rtol, atol=atol, err_msg=n)


_TX = {}


def _tx(config, abstract_params):
  """make_optimizer for ``config`` (built, like the training loop does, from the abstract
  parameters): jitted (init, update + apply, schedule), cached, as every optimizer compiles."""
  key = (repr(sorted(config.optimizer.items())),
         tuple('/'.join(_names(p)) for p, _ in jax.tree_util.tree_leaves_with_path(abstract_params)))
  if key not in _TX:
    tx, schedule = optimizer.make_optimizer(config, abstract_params, CFG)

    def step(grads, state, params):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    _TX[key] = (jax.jit(tx.init), jax.jit(step), schedule)
  return _TX[key]


def _run(config, params, abstract_params, grads_list):
  """Updates from a fresh optimizer state, one update per gradient; returns the parameters after
  each, the schedule and the last optimizer state."""
  init, step, schedule = _tx(config, abstract_params)
  state = init(params)
  history = []
  for g in grads_list:
    params, state = step(g, state, params)
    history.append(params)
  return history, schedule, state


def _global_norm(grads):
  return np.sqrt(sum((x.astype(np.float64) ** 2).sum() for _, x in _leaves(grads)))


# One optimizer for the AdamW and clipping tests (a threshold that normal gradients stay under).
CLIP = 1e4


def test_adamw_steps_match_numpy(params, abstract_params):
  c = _config(grad_clip_norm=CLIP)
  grads = [_grads(params, s) for s in range(4)]
  assert all(_global_norm(g) < CLIP / 2 for g in grads)
  history, schedule, _ = _run(c, params, abstract_params, grads)
  ref = NumpyAdamW(c.optimizer, _leaves(params))
  for s, g in enumerate(grads):
    ref.update(_leaves(g))
    _compare(history[s], ref)
  # Step 0 has lr 0 (warmup from 0): nothing moves.
  for (n, a), (_, b) in zip(_leaves(history[0]), _leaves(params)):
    np.testing.assert_array_equal(a, b, err_msg=n)
  np.testing.assert_allclose([float(schedule(s)) for s in range(4)], [0.0, 0.05, 0.1, 0.01],
                             rtol=1e-6)


def test_grad_clipping(params, abstract_params):
  c = _config(grad_clip_norm=CLIP)
  grads = [_grads(params, 20, scale=1e3), _grads(params, 21), _grads(params, 22)]
  norm = _global_norm(grads[0])
  assert norm > 50 * CLIP
  # Adam's first moment after one step is (1 - b1) x the clipped gradients: clipped by the global
  # norm, each leaf by the same factor.
  _, _, state = _run(c, params, abstract_params, grads[:1])
  mu = dict(_leaves(optax.tree_utils.tree_get(state, 'mu')))
  for n, g in _leaves(grads[0]):
    np.testing.assert_allclose(mu[n], 0.1 * g * CLIP / norm, rtol=1e-4, atol=1e-9, err_msg=n)
  # Parameters over three steps (the clipped first step's moments shape the later updates).
  history, _, _ = _run(c, params, abstract_params, grads)
  ref = NumpyAdamW(c.optimizer, _leaves(params))
  unclipped = NumpyAdamW(_config().optimizer, _leaves(params))
  for s, g in enumerate(grads):
    ref.update(_leaves(g))
    unclipped.update(_leaves(g))
    _compare(history[s], ref)
  name = 'mask_decoder/iou_token/weight'
  assert np.abs(unclipped.p[name] - ref.p[name]).max() > 1e-3


SUBSET = ('image_encoder/pos_embed', 'image_encoder/window_blocks/attn/qkv/kernel',
          'image_encoder/global_blocks/norm1/bias', 'image_encoder/global_blocks/mlp/lin1/kernel',
          'image_encoder/neck/0/kernel', 'mask_decoder/iou_token/weight',
          'mask_decoder/output_upscaling/0/kernel')


def _subset(state):
  sub, _ = nnx.split_state(state, lambda path, _: '/'.join(map(str, path)) in SUBSET, ...)
  return sub


def test_grad_accumulation(params, abstract_params):
  # A few parameters of the tree (every distinct optimizer costs a compile per leaf).
  params, abstract_params = _subset(params), _subset(abstract_params)
  assert len(_leaves(params)) == len(SUBSET)
  c = _config(grad_accum_steps=2, warmup_steps=0, decay_steps=())
  grads = [_grads(params, 30 + s) for s in range(4)]
  history, _, _ = _run(c, params, abstract_params, grads)
  ref = NumpyAdamW(c.optimizer, _leaves(params))
  for k in range(2):
    # Micro-step 2k + 1: nothing changes.
    before = params if k == 0 else history[2 * k - 1]
    for (n, a), (_, b) in zip(_leaves(history[2 * k]), _leaves(before)):
      np.testing.assert_array_equal(a, b, err_msg=n)
    # Micro-step 2k + 2: one AdamW step (step k) on the mean of the two gradients.
    mean = [(n, (a + b) / 2) for (n, a), (_, b) in zip(_leaves(grads[2 * k]),
                                                       _leaves(grads[2 * k + 1]))]
    ref.update(mean)
    _compare(history[2 * k + 1], ref)
