"""sam_jax.training.losses against independent float64 numpy formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.training import losses

ALPHA, GAMMA = 0.25, 2.0

# For the tests that compile a train step or its rounds: no LLVM optimisation of the generated
# kernels (they compile ~1.5x faster on CPU; the subprocess tests set the same XLA flag).
FAST_COMPILE = {'xla_backend_optimization_level': 0}
# Jitted once per shape (eager dispatch compiles every primitive separately, which is slower).
focal_fn = jax.jit(losses.sigmoid_focal_loss, static_argnums=(2, 3))
sam_loss_fn = jax.jit(losses.sam_loss)  # the weights are traced, so one compile serves all


# ---------------------------------------------------------------------------------------------
# Independent numpy references (float64).

def _np_sigmoid(x):
  x = np.asarray(x, np.float64)
  return np.where(x >= 0, 1 / (1 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1 + np.exp(-np.abs(x))))


def np_focal(logits, targets, alpha=ALPHA, gamma=GAMMA):
  """RetinaNet: FL = -alpha_t (1 - p_t)^gamma log(p_t), mean over the last two axes."""
  x = np.asarray(logits, np.float64)
  t = np.asarray(targets, np.float64)
  s = 2 * t - 1                              # +1 for a positive, -1 for a negative
  p_t = _np_sigmoid(s * x)                   # sigmoid(x) on positives, 1 - sigmoid(x) on negatives
  log_p_t = -np.logaddexp(0.0, -s * x)       # log sigmoid(s x), exact for large |x|
  alpha_t = np.where(t > 0, alpha, 1 - alpha)
  return (-alpha_t * (1 - p_t) ** gamma * log_p_t).mean(axis=(-2, -1))


def np_dice(logits, targets):
  p = _np_sigmoid(logits)
  t = np.asarray(targets, np.float64)
  return 1 - (2 * (p * t).sum((-2, -1)) + 1) / (p.sum((-2, -1)) + t.sum((-2, -1)) + 1)


def np_iou(logits, targets):
  pred = np.asarray(logits) > 0
  t = np.asarray(targets).astype(bool)
  inter = (pred & t).sum((-2, -1))
  union = (pred | t).sum((-2, -1))
  return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


# ---------------------------------------------------------------------------------------------
# sigmoid_focal_loss

def test_focal_matches_numpy_random():
  rng = np.random.default_rng(0)
  logits = rng.normal(scale=3.0, size=(3, 5, 8, 8)).astype(np.float32)
  targets = rng.random((3, 5, 8, 8)) < 0.4
  got = np.asarray(focal_fn(jnp.asarray(logits), jnp.asarray(targets)))
  assert got.shape == (3, 5)
  np.testing.assert_allclose(got, np_focal(logits, targets), rtol=1e-5, atol=1e-7)


def test_focal_extreme_logits_finite_and_exact():
  rng = np.random.default_rng(1)
  logits = rng.choice(np.array([-30.0, -20.0, 20.0, 30.0, -100.0, 100.0], np.float32),
                      size=(4, 6, 6))
  targets = rng.random((4, 6, 6)) < 0.5
  got = np.asarray(focal_fn(jnp.asarray(logits), jnp.asarray(targets)))
  assert np.all(np.isfinite(got))
  ref = np_focal(logits, targets)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  # Entirely wrong confident predictions: 0.75 * 30 on a negative at +30, 0.25 * 30 on a
  # positive at -30; entirely right ones cost ~0.
  x = jnp.array([[[30.0, -30.0]], [[30.0, -30.0]]])
  t = jnp.array([[[0, 1]], [[1, 0]]], bool)
  got = np.asarray(losses.sigmoid_focal_loss(x, t))
  np.testing.assert_allclose(got, [(0.75 * 30 + 0.25 * 30) / 2, 0.0], rtol=1e-5, atol=1e-12)


def test_focal_gradient_finite_at_extremes():
  x = jnp.array([[[-30.0, 30.0, 0.0, 80.0]]])
  t = jnp.array([[[1, 0, 1, 1]]], bool)
  g = jax.jit(jax.grad(lambda x: losses.sigmoid_focal_loss(x, t).sum()))(x)
  assert np.all(np.isfinite(np.asarray(g)))


def test_focal_alpha_gamma_arguments():
  rng = np.random.default_rng(2)
  logits = rng.normal(scale=2.0, size=(2, 7, 7)).astype(np.float32)
  targets = rng.random((2, 7, 7)) < 0.5
  for alpha, gamma in [(0.5, 0.0), (0.1, 1.0), (0.9, 3.0)]:
    got = focal_fn(jnp.asarray(logits), jnp.asarray(targets), alpha, gamma)
    np.testing.assert_allclose(np.asarray(got), np_focal(logits, targets, alpha, gamma),
                               rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# dice_loss / mask_iou

def test_dice_matches_numpy():
  rng = np.random.default_rng(3)
  logits = rng.normal(scale=4.0, size=(2, 3, 9, 9)).astype(np.float32)
  targets = rng.random((2, 3, 9, 9)) < 0.3
  targets[0, 0] = False  # empty target
  logits[1, 2] = 30.0    # saturated prediction
  got = np.asarray(losses.dice_loss(jnp.asarray(logits), jnp.asarray(targets)))
  assert got.shape == (2, 3)
  np.testing.assert_allclose(got, np_dice(logits, targets), rtol=1e-5, atol=1e-6)


def test_mask_iou_matches_numpy():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(5, 4, 8, 8)).astype(np.float32)
  targets = rng.random((5, 4, 8, 8)) < 0.5
  logits[0, 0] = -1.0; targets[0, 0] = False   # both empty -> 1
  logits[0, 1] = -1.0                           # empty prediction -> 0 (target not empty)
  targets[0, 2] = False                         # empty target -> 0 (prediction not empty)
  logits[0, 3] = np.where(targets[0, 3], 2.0, -2.0)  # perfect -> 1
  logits[1, 0] = 0.0                            # exactly 0 is not > 0: empty prediction
  targets[1, 0] = False
  got = np.asarray(losses.mask_iou(jnp.asarray(logits), jnp.asarray(targets)))
  ref = np_iou(logits, targets)
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  assert got[0, 0] == 1.0 and got[0, 1] == 0.0 and got[0, 2] == 0.0 and got[0, 3] == 1.0
  assert got[1, 0] == 1.0


# ---------------------------------------------------------------------------------------------
# sam_loss

L = 8


def _case(seed=5):
  """4 masks x 4 outputs; in each, a *disallowed* output is a near-perfect prediction (lowest
  mask loss, highest IoU), so choosing it or counting it would show."""
  rng = np.random.default_rng(seed)
  n, k = 4, 4
  targets = rng.random((n, L, L)) < 0.4
  logits = rng.normal(scale=2.0, size=(n, k, L, L)).astype(np.float32)
  allowed = np.array([[False, True, True, True],
                      [True, False, False, False],
                      [False, True, True, True],
                      [True, False, False, False]])
  perfect = {0: 0, 1: 2, 2: 0, 3: 1}  # a disallowed output per mask
  for i, j in perfect.items():
    assert not allowed[i, j]
    logits[i, j] = np.where(targets[i], 12.0, -12.0)
  # Mask 2: make output 3 much better than 1 and 2 (not perfect), so the allowed argmin is clear.
  logits[2, 3] = np.where(targets[2], 3.0, -3.0) + rng.normal(scale=0.5, size=(L, L))
  logits[2, 3, :2, :2] *= -1  # 4 wrong cells: IoU < 1
  iou_pred = rng.random((n, k)).astype(np.float32)
  return logits, iou_pred, targets, allowed


def _np_sam_loss(logits, iou_pred, targets, allowed, fw=20.0, dw=1.0, iw=1.0):
  t = targets[:, None]
  focal = np_focal(logits, t)
  dice = np_dice(logits, t)
  mask_loss = fw * focal + dw * dice
  best = np.array([np.flatnonzero(a)[np.argmin(m[a])] for m, a in zip(mask_loss, allowed)])
  iou = np_iou(logits, t)
  mse = np.array([np.mean((p[a] - i[a]) ** 2) for p, i, a in zip(iou_pred, iou, allowed)])
  rows = np.arange(len(best))
  return {'loss': mask_loss[rows, best] + iw * mse, 'focal': focal[rows, best],
          'dice': dice[rows, best], 'iou_mse': mse, 'best': best, 'iou': iou[rows, best],
          'iou_oracle': np.array([i[a].max() for i, a in zip(iou, allowed)]),
          'mask_loss': mask_loss, 'true_iou': iou}


def test_sam_loss_matches_numpy_and_ignores_disallowed():
  logits, iou_pred, targets, allowed = _case()
  out = sam_loss_fn(jnp.asarray(logits), jnp.asarray(iou_pred),
                                 jnp.asarray(targets), jnp.asarray(allowed))
  out = {k: np.asarray(v) for k, v in out.items()}
  ref = _np_sam_loss(logits, iou_pred, targets, allowed)
  # Sanity of the construction: the overall argmin is a disallowed output.
  overall = ref['mask_loss'].argmin(1)
  assert not allowed[np.arange(4), overall].any()
  assert np.all(ref['true_iou'][np.arange(4), overall] == 1.0)

  np.testing.assert_array_equal(out['best'], ref['best'])
  assert allowed[np.arange(4), out['best']].all()
  for k in ('loss', 'focal', 'dice', 'iou_mse', 'iou', 'iou_oracle'):
    assert out[k].shape == (4,), k
    np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # The oracle is not the disallowed perfect output's 1.0.
  assert np.all(out['iou_oracle'] < 1.0)


def test_sam_loss_weights():
  logits, iou_pred, targets, allowed = _case(seed=6)
  for fw, dw, iw in [(1.0, 0.0, 0.0), (0.0, 1.0, 2.0), (5.0, 3.0, 0.5)]:
    out = sam_loss_fn(jnp.asarray(logits), jnp.asarray(iou_pred), jnp.asarray(targets),
                      jnp.asarray(allowed), fw, dw, iw)
    ref = _np_sam_loss(logits, iou_pred, targets, allowed, fw, dw, iw)
    np.testing.assert_array_equal(np.asarray(out['best']), ref['best'])
    np.testing.assert_allclose(np.asarray(out['loss']), ref['loss'], rtol=1e-5, atol=1e-6)


def test_sam_loss_single_allowed_output_is_chosen_even_if_worst():
  rng = np.random.default_rng(7)
  targets = rng.random((4, L, L)) < 0.5
  logits = np.stack([np.where(targets, 9.0, -9.0)] * 4, axis=1).astype(np.float32)
  logits[:, 3] = np.where(targets, -9.0, 9.0)  # output 3: completely wrong
  allowed = np.zeros((4, 4), bool)
  allowed[:, 3] = True
  out = sam_loss_fn(jnp.asarray(logits), jnp.zeros((4, 4)), jnp.asarray(targets),
                    jnp.asarray(allowed))
  np.testing.assert_array_equal(np.asarray(out['best']), [3] * 4)
  np.testing.assert_allclose(np.asarray(out['iou_oracle']), [0.0] * 4)
  np.testing.assert_allclose(np.asarray(out['iou_mse']), [0.0] * 4)


def test_sam_loss_gradient_only_through_chosen_output():
  logits, iou_pred, targets, allowed = _case(seed=8)
  t, a, ip = jnp.asarray(targets), jnp.asarray(allowed), jnp.asarray(iou_pred)
  best = np.asarray(sam_loss_fn(jnp.asarray(logits), ip, t, a)['best'])
  g = jax.jit(jax.grad(lambda lg: losses.sam_loss(lg, ip, t, a, iou_weight=0.0)['loss'].sum()))(
      jnp.asarray(logits))
  g = np.asarray(g)
  for n in range(4):
    for k in range(4):
      if k == best[n]:
        assert np.abs(g[n, k]).max() > 0, (n, k)
      else:
        assert np.all(g[n, k] == 0), (n, k)
  # The chosen output's gradient is that of 20 * focal + dice alone.
  one = jax.grad(lambda x, tn: 20 * losses.sigmoid_focal_loss(x, tn) + losses.dice_loss(x, tn))
  gn = jax.jit(jax.vmap(one))(jnp.asarray(logits[np.arange(4), best]), t)
  np.testing.assert_allclose(g[np.arange(4), best], np.asarray(gn), rtol=1e-5, atol=1e-9)


def test_sam_loss_true_iou_is_constant():
  logits, iou_pred, targets, allowed = _case(seed=9)
  t, a = jnp.asarray(targets), jnp.asarray(allowed)

  def iou_term(lg, ip):
    return losses.sam_loss(lg, ip, t, a, focal_weight=0.0, dice_weight=0.0)['loss'].sum()

  g_logits, g_pred = jax.jit(jax.grad(iou_term, argnums=(0, 1)))(jnp.asarray(logits), jnp.asarray(iou_pred))
  assert np.all(np.asarray(g_logits) == 0)
  # d/dp mean_allowed (p - iou)^2 = 2 (p - iou) / n_allowed on allowed outputs, 0 elsewhere.
  iou = np_iou(logits, targets[:, None])
  ref = np.where(allowed, 2 * (iou_pred - iou) / allowed.sum(1, keepdims=True), 0.0)
  np.testing.assert_allclose(np.asarray(g_pred), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_sam_loss_low_precision_logits_computed_in_float32(dtype):
  logits, iou_pred, targets, allowed = _case(seed=10)
  lg = jnp.asarray(logits).astype(dtype)
  out = sam_loss_fn(lg, jnp.asarray(iou_pred).astype(dtype), jnp.asarray(targets),
                    jnp.asarray(allowed))
  assert out['loss'].dtype == jnp.float32
  ref = _np_sam_loss(np.asarray(lg.astype(jnp.float32)),
                     np.asarray(jnp.asarray(iou_pred).astype(dtype).astype(jnp.float32)),
                     targets, allowed)
  np.testing.assert_allclose(np.asarray(out['loss']), ref['loss'], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# grouping_loss (the auxiliary loss on the image embedding).

def np_grouping(emb, masks, scale=10.0):
  """Loops over images and masks; float64."""
  emb = np.asarray(emb, np.float64)
  b, g, _, c = emb.shape
  m, low = masks.shape[1], masks.shape[-1]
  f = low // g
  out = np.zeros((b, m))
  for i in range(b):
    e = emb[i] / np.sqrt((emb[i] ** 2).sum(-1, keepdims=True) + 1e-6)
    for j in range(m):
      frac = np.zeros((g, g))
      for y in range(g):
        for x in range(g):
          frac[y, x] = masks[i, j, y * f:(y + 1) * f, x * f:(x + 1) * f].mean()
      proto = (frac[..., None] * e).sum((0, 1))
      proto = proto / np.sqrt((proto ** 2).sum() + 1e-6)
      logits = scale * (e @ proto - 0.5)
      bce = np.logaddexp(0.0, logits) - logits * frac
      out[i, j] = bce.mean() + np_dice(logits, frac)
  return out


def test_grouping_loss_matches_numpy():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(2, 4, 4, 8)).astype(np.float32)
  masks = rng.random((2, 3, 16, 16)) < 0.3
  masks[1, 2] = False  # an empty mask: zero prototype, finite loss
  got = np.asarray(jax.jit(losses.grouping_loss)(jnp.asarray(emb), jnp.asarray(masks)))
  np.testing.assert_allclose(got, np_grouping(emb, masks), rtol=1e-5, atol=1e-6)


def test_grouping_loss_rewards_one_code_per_object_and_has_finite_gradients():
  """Tokens carrying their object's own (orthogonal) code score far below random embeddings,
  and an all-zero embedding with an empty mask still has a finite gradient."""
  rng = np.random.default_rng(1)
  ids = rng.integers(0, 3, (2, 4, 4))                      # object id of each token
  codes = np.eye(8)[:3]                                    # orthogonal codes
  coded = codes[ids].astype(np.float32)                    # (2, 4, 4, 8)
  masks = np.repeat(np.repeat(ids[:, None] == np.arange(3)[None, :, None, None], 4, 2), 4, 3)
  loss = jax.jit(losses.grouping_loss)
  good = float(loss(jnp.asarray(coded), jnp.asarray(masks)).mean())
  noise = float(loss(jnp.asarray(rng.normal(size=coded.shape).astype(np.float32)),
                     jnp.asarray(masks)).mean())
  assert good < 0.1 < 0.5 < noise
  masks[0, 1] = False
  grad = jax.grad(lambda e: loss(e, jnp.asarray(masks)).sum())(jnp.zeros(coded.shape))
  assert np.isfinite(np.asarray(grad)).all()


def _tiny_case(seed, **config):
  """vit_tiny with random weights, a synthetic batch of 2 images x 3 masks (numpy; points and boxes
  alternate) and a training config for them without dropout or remat, updated by ``config``."""
  from flax import nnx

  from bench.train_step import synthetic_batch
  from sam_jax.modeling.config import VARIANTS
  from sam_jax.modeling.sam import Sam
  from sam_jax.training import config as train_config

  spec = {'image': jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.uint8),
          'masks': jax.ShapeDtypeStruct((2, 3, 64, 64), jnp.bool_)}
  c = train_config.default_config()
  c.update(model='vit_tiny', drop_path_rate=0.0, decoder_dropout=0.0, remat='none',
           round_remat=False)
  c.update(**config)
  return Sam(VARIANTS['vit_tiny'], rngs=nnx.Rngs(0)), synthetic_batch(spec, seed=seed), c


def test_grouping_loss_enters_the_train_step():
  """With ``grouping_loss_weight`` w the step's loss is the rounds' mean plus w x the mean over
  valid masks of ``grouping_loss`` of the encoder's embedding, reported as 'grouping_loss'.
  The same compiled step then checks the 'finite' flag on the updated parameters: an update to inf
  is caught while the loss is still finite, huge but finite parameters are not."""
  import optax

  from sam_jax.training import train_step

  model, batch, config = _tiny_case(0, model_dtype='float32', num_rounds=2,
                                    grouping_loss_weight=2.5)
  graphdef, params, frozen = train_step.split_model(model, 'all')
  batch['mask_valid'][0, 2] = False     # an unused slot: left out of the mean
  valid = batch['mask_valid']
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.0)  # the rate: an input of the step
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'frozen': frozen,
           'opt_state': tx.init(params), 'rng': jax.random.PRNGKey(0)}
  step = jax.jit(train_step.make_train_step(graphdef, config, tx, optax.constant_schedule(0.0)),
                 compiler_options=FAST_COMPILE)
  _, metrics = step(state, batch)
  assert bool(metrics['finite'])

  def at_rate(rate):
    opt_state = state['opt_state']
    hyper = dict(opt_state.hyperparams, learning_rate=jnp.float32(rate))
    return step(dict(state, opt_state=opt_state._replace(hyperparams=hyper)), batch)[1]

  huge, overflow = at_rate(1e30), at_rate(np.inf)
  assert np.isfinite(float(huge['loss'])) and np.isfinite(float(overflow['loss']))
  assert bool(huge['finite']) and float(huge['param_norm']) == np.inf  # squares overflow
  assert not bool(overflow['finite'])

  emb = model.image_encoder(train_step.prepare_images(jnp.asarray(batch['image'])))
  expected = np.asarray(losses.grouping_loss(emb, jnp.asarray(batch['masks'])))[valid].mean()
  np.testing.assert_allclose(float(metrics['grouping_loss']), expected, rtol=1e-4)
  rounds = float(np.mean(np.asarray(metrics['round/loss'])))
  np.testing.assert_allclose(float(metrics['loss']), rounds + 2.5 * expected, rtol=1e-5)


def test_decoder_mask_chunks_give_the_same_losses_and_gradients():
  """``decoder_mask_chunk`` only changes how many masks the decoder runs at a time (and what the
  backward pass keeps): the rounds' losses and the gradients equal the all-masks pass's; a chunk
  that does not divide the masks is refused by name."""
  from flax import nnx

  from sam_jax.training import train_step

  model, batch, config = _tiny_case(1, num_rounds=4)
  graphdef, params, frozen = train_step.split_model(model, 'all')
  batch = jax.tree.map(jnp.asarray, batch)

  def run(chunk, round_remat):
    config.update(round_remat=round_remat, decoder_mask_chunk=chunk)  # read when traced, below

    def loss(params):
      out = train_step.forward_rounds(nnx.merge(graphdef, params, frozen), batch,
                                      jax.random.key(3), config, train=True)
      return out['loss'].mean(), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True),
                             compiler_options=FAST_COMPILE)(params)
    return out, grads

  ref, ref_grads = run(0, False)
  out, grads = run(3, True)  # 2 chunks of 3 masks, inside the rematerialised rounds
  for name in ('loss', 'iou_confident', 'num_points'):
    np.testing.assert_allclose(np.asarray(out[name]), np.asarray(ref[name]), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out['coords']), np.asarray(ref['coords']))
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match='decoder_mask_chunk=4 must divide the 6 masks'):
    run(4, False)
  with pytest.raises(ValueError, match='decoder_mask_chunk=-1 must divide the 6 masks'):
    run(-1, False)


def test_point_every_round_adds_a_point_in_every_training_round():
  """``point_every_round``: each round after the first adds a point from the error region, also in
  a 2-round schedule (where the paper's adds none: the last round only feeds the mask back)."""
  from sam_jax.training import train_step

  model, batch, config = _tiny_case(2, num_rounds=2, point_every_round=True)
  batch = jax.tree.map(jnp.asarray, batch)
  out = jax.jit(lambda: train_step.forward_rounds(model, batch, jax.random.key(0), config,
                                                   train=True), compiler_options=FAST_COMPILE)()
  points = np.asarray(out['num_points'])  # (2 rounds, 6 masks)
  np.testing.assert_array_equal(points[0], np.tile([1, 0, 1], 2))  # a point, a box, a point
  np.testing.assert_array_equal(points[1], points[0] + 1)  # random weights: every mask has errors
  labels = np.asarray(out['labels'])[:, 2]
  assert set(labels) <= {0, 1}
