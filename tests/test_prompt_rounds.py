"""sam_jax.training.prompt_rounds: point sampling, the round schedule, output selection and the
simulated interactive rounds (with a fake decoder replayed in numpy)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.modeling.prompt_encoder import PAD_LABEL
from sam_jax.training import prompt_rounds as pr


def _cells(coords, image_size, low):
  """[x, y] cell centres in the input frame -> integer (y, x) cells (asserting they are centres)."""
  scale = image_size / low
  c = (np.asarray(coords, np.float64) - (scale - 1) / 2) / scale
  np.testing.assert_allclose(c, np.round(c), atol=1e-6)
  c = np.round(c).astype(int)
  assert np.all((c >= 0) & (c < low))
  return c[..., 1], c[..., 0]


# ---------------------------------------------------------------------------------------------
# sample_error_points

N, LOW, IMG = 16, 32, 128
sample_fn = jax.jit(pr.sample_error_points, static_argnums=4)


def _random_case(seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(N, LOW, LOW)).astype(np.float32)
  targets = rng.random((N, LOW, LOW)) < 0.5
  region = np.zeros((N, LOW, LOW), bool)
  for n in range(N):
    region[n, :rng.integers(4, LOW + 1), :rng.integers(4, LOW + 1)] = True
  # Mask 0: a perfect prediction -> no error at all.
  logits[0] = np.where(targets[0], 1.0, -1.0)
  # Mask 1: errors only outside the region.
  logits[1] = np.where(targets[1], 1.0, -1.0)
  region[1] = False
  region[1, :10, :10] = True
  logits[1, 20:, 20:] *= -1
  # Mask 2: only false negatives; mask 3: only false positives (inside the region).
  region[2:4] = True
  logits[2] = np.where(targets[2], 1.0, -1.0)
  logits[2, targets[2] & (rng.random((LOW, LOW)) < 0.3)] = -1.0
  logits[3] = np.where(targets[3], 1.0, -1.0)
  logits[3, ~targets[3] & (rng.random((LOW, LOW)) < 0.3)] = 1.0
  return logits, targets, region


def test_sample_error_points_in_error_region_with_right_labels():
  logits, targets, region = _random_case()
  pred = logits > 0
  fn = targets & ~pred
  fp = pred & ~targets
  error = (fn | fp) & region
  for seed in range(3):
    coords, labels = sample_fn(jax.random.PRNGKey(seed), jnp.asarray(logits), jnp.asarray(targets),
                       jnp.asarray(region), IMG)
    coords, labels = np.asarray(coords), np.asarray(labels)
    assert coords.shape == (N, 2) and labels.shape == (N,)
    has_error = error.reshape(N, -1).any(1)
    assert not has_error[0] and not has_error[1] and has_error[2:].all()
    np.testing.assert_array_equal(labels[~has_error], PAD_LABEL)
    for n in np.flatnonzero(has_error):
      y, x = _cells(coords[n], IMG, LOW)
      assert error[n, y, x], (n, y, x)
      assert region[n, y, x]
      assert labels[n] == (1 if fn[n, y, x] else 0), n
      assert fn[n, y, x] != fp[n, y, x]
    assert labels[2] == 1 and labels[3] == 0


def test_sample_error_points_key_dependence():
  logits, targets, region = _random_case(1)
  args = (jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(region), IMG)
  c1, l1 = sample_fn(jax.random.PRNGKey(3), *args)
  c2, l2 = sample_fn(jax.random.PRNGKey(3), *args)
  c3, _ = sample_fn(jax.random.PRNGKey(4), *args)
  np.testing.assert_array_equal(np.asarray(c1), np.asarray(c2))
  np.testing.assert_array_equal(np.asarray(l1), np.asarray(l2))
  assert np.any(np.asarray(c1) != np.asarray(c3))


def test_sample_error_points_uniform_over_error_cells():
  low = 8
  targets = np.zeros((1, low, low), bool)
  targets[0, 2, 3] = targets[0, 5, 5] = True  # two false negatives
  logits = np.full((1, low, low), -1.0, np.float32)
  logits[0, 0, 0] = logits[0, 7, 1] = 1.0  # two false positives
  targets[0, 6, 6] = True; logits[0, 6, 6] = 1.0  # a true positive (not an error)
  region = np.ones((1, low, low), bool)
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  f = jax.jit(jax.vmap(lambda k: pr.sample_error_points(k, jnp.asarray(logits),
                                                        jnp.asarray(targets),
                                                        jnp.asarray(region), 32)))
  coords, labels = f(keys)
  ys, xs = _cells(np.asarray(coords)[:, 0], 32, low)
  labels = np.asarray(labels)[:, 0]
  cells = {(2, 3): 1, (5, 5): 1, (0, 0): 0, (7, 1): 0}
  total = 0
  for (y, x), lab in cells.items():
    hit = (ys == y) & (xs == x)
    frac = hit.mean()
    assert 0.2 <= frac <= 0.3, ((y, x), frac)
    assert np.all(labels[hit] == lab)
    total += hit.sum()
  assert total == 4000


# ---------------------------------------------------------------------------------------------
# point_rounds / image_region / allowed_outputs / most_confident

def test_point_rounds_schedule():
  r, n = 11, 256
  a = np.asarray(pr.point_rounds(jax.random.PRNGKey(0), n, r))
  assert a.shape == (r, n) and a.dtype == bool
  assert not a[0].any() and not a[r - 1].any()
  np.testing.assert_array_equal(a[1:r - 1].sum(0), r - 3)
  skipped = np.argmin(a[1:r - 1], axis=0) + 1  # the one round of 1..R-2 without a point
  assert set(skipped) == set(range(1, r - 1))  # every position occurs among 256 masks
  b = np.asarray(pr.point_rounds(jax.random.PRNGKey(1), n, r))
  assert np.any(a != b)
  np.testing.assert_array_equal(a, np.asarray(pr.point_rounds(jax.random.PRNGKey(0), n, r)))
  assert np.asarray(pr.point_rounds(jax.random.PRNGKey(0), n)).shape == (pr.NUM_ROUNDS, n)


@pytest.mark.parametrize('r', [1, 2, 3, 4, 6])
def test_point_rounds_small(r):
  a = np.asarray(pr.point_rounds(jax.random.PRNGKey(2), 7, r))
  assert a.shape == (r, 7)
  assert not a[0].any() and not a[-1].any()
  np.testing.assert_array_equal(a.sum(0), max(r - 3, 0))


def test_image_region():
  low, img = 16, 64  # scale 4
  sizes = np.array([[64, 64], [13, 64], [64, 12], [1, 1], [0, 30], [17, 33]])
  got = np.asarray(pr.image_region(jnp.asarray(sizes), low, img))
  assert got.shape == (len(sizes), low, low) and got.dtype == bool
  ref = np.zeros_like(got)
  for b, (h, w) in enumerate(sizes):
    for y in range(low):
      for x in range(low):
        ref[b, y, x] = y * 4 < h and x * 4 < w
  np.testing.assert_array_equal(got, ref)
  assert got[0].all() and not got[4].any()
  assert got[1, :4].all() and not got[1, 4:].any()  # rows 0, 4, 8, 12 < 13


def test_allowed_outputs():
  P = PAD_LABEL
  labels = np.array([
      [1, -1, P, P, P],    # a lone positive point -> the multimask outputs 1..3
      [2, 3, P, P, P],     # a box -> output 0
      [1, 0, P, P, P],     # two points -> output 0
      [1, -1, 1, P, P],    # a point plus a sampled one -> output 0
      [1, -1, P, 0, P],    # idem, with a PAD slot between
      [2, 3, 1, P, P],     # box + point -> output 0
      [1, P, P, P, P],     # a point plus PAD slots stays multimask
      [2, 3, P, P, P],
  ])
  got = np.asarray(pr.allowed_outputs(jnp.asarray(labels)))
  multi, single = [False, True, True, True], [True, False, False, False]
  ref = np.array([multi, single, single, single, single, single, multi, single])
  np.testing.assert_array_equal(got, ref)


def test_most_confident():
  rng = np.random.default_rng(0)
  n, low = 6, 5
  logits = rng.normal(size=(n, 4, low, low)).astype(np.float32)
  iou_pred = rng.random((n, 4)).astype(np.float32)
  allowed = np.array([[False, True, True, True], [True, False, False, False]] * 3)
  # The disallowed outputs get the highest IoU predictions.
  iou_pred = np.where(allowed, iou_pred, 2.0 + rng.random((n, 4))).astype(np.float32)
  got = np.asarray(pr.most_confident(jnp.asarray(logits), jnp.asarray(iou_pred),
                                     jnp.asarray(allowed)))
  assert got.shape == (n, low, low)
  for i in range(n):
    ks = np.flatnonzero(allowed[i])
    k = ks[np.argmax(iou_pred[i, ks])]
    np.testing.assert_array_equal(got[i], logits[i, k])


# ---------------------------------------------------------------------------------------------
# simulate, with a fake decoder

SL, SIMG = 16, 64            # low-res side, input size: scale 4
SCALE = SIMG // SL
RADII2 = (36, 100, 196, 400)  # squared radii (input pixels) of the 4 outputs' discs


def fake_decode(coords, labels, mask_input, xp):
  """A deterministic stand-in for the decoder, exact in float32 (dyadic values only).

  Output k: 0.5 * mask_input (-1 everywhere when None) + 4 inside discs of radius_k around
  positive points (or inside a box) - 8 inside discs around negative points - 1 + k / 4, with cell
  (0, 0) forced to -5. IoU predictions depend on the output, the mask and the number of points,
  and favour different outputs across masks and rounds.
  """
  n = labels.shape[0]
  centre = xp.arange(SL, dtype=xp.float32) * SCALE + (SCALE - 1) / 2
  yy, xx = centre[:, None], centre[None, :]
  cx, cy = coords[..., 0][:, :, None, None], coords[..., 1][:, :, None, None]  # (N, T, 1, 1)
  d2 = (xx - cx) ** 2 + (yy - cy) ** 2  # (N, T, L, L)
  pos = (labels == 1)[:, :, None, None]
  neg = (labels == 0)[:, :, None, None]
  is_box = (labels[:, 0] == 2)[:, None, None]
  in_box = ((xx >= coords[:, 0, 0][:, None, None]) & (xx <= coords[:, 1, 0][:, None, None])
            & (yy >= coords[:, 0, 1][:, None, None]) & (yy <= coords[:, 1, 1][:, None, None]))
  m = -xp.ones((n, SL, SL), xp.float32) if mask_input is None else mask_input
  outs = []
  for k, r2 in enumerate(RADII2):
    p = (pos & (d2 < r2)).any(axis=1) | (is_box & in_box)
    q = (neg & (d2 < r2 / 4)).any(axis=1)
    o = 0.5 * m + 4.0 * p - 8.0 * q - 1.0 + k / 4
    outs.append(o)
  logits = xp.stack(outs, axis=1)
  corner = xp.zeros((SL, SL), bool)
  corner = corner.at[0, 0].set(True) if xp is jnp else _set00(corner)
  logits = xp.where(corner, -5.0, logits).astype(xp.float32)
  npts = ((labels == 0) | (labels == 1)).sum(axis=1)[:, None]
  k = xp.arange(4)[None]
  iou = ((k * 7 + npts * 3 + xp.arange(n)[:, None]) % 5) / 5 + k / 64
  return logits, iou.astype(xp.float32)


def _set00(a):
  a = a.copy()
  a[0, 0] = True
  return a


def _np_sigmoid(x):
  x = np.asarray(x, np.float64)
  e = np.exp(-np.abs(x))
  return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _np_mask_losses(logits, targets):
  x = np.asarray(logits, np.float64)
  t = np.asarray(targets, np.float64)[:, None]
  s = 2 * t - 1
  p_t = _np_sigmoid(s * x)
  focal = (-np.where(t > 0, 0.25, 0.75) * (1 - p_t) ** 2 * -np.logaddexp(0, -s * x)).mean((-2, -1))
  p = _np_sigmoid(x)
  dice = 1 - (2 * (p * t).sum((-2, -1)) + 1) / (p.sum((-2, -1)) + t.sum((-2, -1)) + 1)
  pred = x > 0
  tb = t.astype(bool)
  inter, union = (pred & tb).sum((-2, -1)), (pred | tb).sum((-2, -1))
  return focal, dice, np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _np_iou(pred, t):
  inter, union = (pred & t).sum((-2, -1)), (pred | t).sum((-2, -1))
  return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _sim_case():
  """6 masks: points and boxes as first prompts; cell (0, 0) is always a false negative (the
  fake decoder never predicts it) except in mask 5, whose region is empty (never any error)."""
  rng = np.random.default_rng(0)
  n = 6
  yy, xx = np.mgrid[:SL, :SL]
  targets = np.zeros((n, SL, SL), bool)
  for i in range(n):
    cy, cx = rng.integers(3, SL - 3, size=2)
    targets[i] = (yy - cy) ** 2 + 2 * (xx - cx) ** 2 < rng.integers(6, 30)
    targets[i] |= (yy > SL - 4) & (xx < i + 2)
  targets[:, 0, 0] = True
  sizes = np.array([[64, 64], [64, 48], [40, 64], [64, 64], [52, 60], [0, 0]])
  region = np.asarray(pr.image_region(jnp.asarray(sizes), SL, SIMG))
  coords = np.zeros((n, 2, 2), np.float32)
  labels = np.full((n, 2), -1, np.int32)
  for i in range(n):
    ys, xs = np.nonzero(targets[i])
    if i in (1, 4):  # a box around the target
      coords[i] = [[xs.min() * SCALE, ys.min() * SCALE], [xs.max() * SCALE + 3, ys.max() * SCALE + 3]]
      labels[i] = [2, 3]
    else:
      j = rng.integers(len(ys))
      coords[i, 0] = [xs[j] * SCALE + 1.5, ys[j] * SCALE + 1.5]
      labels[i] = [1, -1]
  return coords, labels, targets, region


@functools.lru_cache(maxsize=None)
def _sim_fn(every, num_rounds, remat):
  """A jitted simulate with the fake decoder (compiled once per setting); the list records its
  calls at trace time (one: every round is in the scan)."""
  calls = []

  def decode(c, l, m, given, k):
    calls.append(m.shape)
    return fake_decode(c, l, jnp.where(given, m, -1.0), jnp)  # (None in round 0: -1)

  return jax.jit(functools.partial(pr.simulate, decode, image_size=SIMG, num_rounds=num_rounds,
                                   remat=remat, every_round_adds_point=every)), calls


def _run_sim(key, every=False, num_rounds=11, remat=False):
  coords, labels, targets, region = case = _sim_case()
  f, calls = _sim_fn(every, num_rounds, remat)
  out = f(key, jnp.asarray(coords), jnp.asarray(labels), jnp.asarray(targets),
          jnp.asarray(region))
  return {k: np.asarray(v) for k, v in out.items()}, calls, case


def _replay(out, case, num_rounds, every):
  """Re-runs the rounds in numpy from the final prompts; checks each round against `out`."""
  coords0, labels0, targets, region = case
  n = targets.shape[0]
  fc, fl = out['coords'], out['labels']
  t = num_rounds + 1
  assert fc.shape == (n, t, 2) and fl.shape == (n, t)
  np.testing.assert_array_equal(fc[:, :2], coords0)
  np.testing.assert_array_equal(fl[:, :2], labels0)
  prev = None
  for r in range(num_rounds):
    if r > 0:  # slot r + 1: the point sampled from round r - 1's fed-back prediction
      pred = prev > 0
      fn, fp = targets & ~pred, pred & ~targets
      error = (fn | fp) & region
      for i in range(n):
        lab = fl[i, r + 1]
        if lab == PAD_LABEL:
          np.testing.assert_array_equal(fc[i, r + 1], 0.0)
          if every:
            assert not error[i].any(), (r, i)
        else:
          assert lab in (0, 1)
          y, x = _cells(fc[i, r + 1], SIMG, SL)
          assert error[i, y, x] and region[i, y, x], (r, i)
          assert lab == int(fn[i, y, x]), (r, i)
    c = fc.copy()
    l = fl.copy()
    c[:, r + 2:] = 0.0
    l[:, r + 2:] = PAD_LABEL
    logits, iou_pred = fake_decode(c, l, prev, np)
    multi = (((l == 0) | (l == 1)).sum(1) == 1) & ~(l == 2).any(1)
    allowed = np.where(multi[:, None], np.arange(4)[None] >= 1, np.arange(4)[None] == 0)
    focal, dice, iou = _np_mask_losses(logits, targets)
    mask_loss = 20 * focal + dice
    best = np.where(allowed, mask_loss, np.inf).argmin(1)
    rows = np.arange(n)
    mse = np.where(allowed, (iou_pred - iou) ** 2, 0).sum(1) / allowed.sum(1)
    np.testing.assert_array_equal(out['num_points'][r], ((l == 0) | (l == 1)).sum(1))
    np.testing.assert_array_equal(out['best'][r], best, err_msg=f'round {r}')
    np.testing.assert_allclose(out['loss'][r], mask_loss[rows, best] + mse, rtol=2e-5, atol=1e-6,
                               err_msg=f'round {r}')
    np.testing.assert_allclose(out['focal'][r], focal[rows, best], rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(out['dice'][r], dice[rows, best], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(out['iou_mse'][r], mse, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(out['iou'][r], iou[rows, best], rtol=1e-6)
    np.testing.assert_allclose(out['iou_oracle'][r], np.where(allowed, iou, 0).max(1), rtol=1e-6)
    conf = np.where(allowed, iou_pred, -np.inf).argmax(1)
    prev = logits[rows, conf]  # what round r + 1 must receive as its mask input
    np.testing.assert_allclose(out['iou_confident'][r], _np_iou(prev > 0, targets), rtol=1e-6,
                               err_msg=f'round {r}')
  return fl


KEYS = ('loss', 'focal', 'dice', 'iou_mse', 'best', 'iou', 'iou_oracle', 'num_points',
        'iou_confident')


@pytest.mark.parametrize('seed', [0, 1])
def test_simulate_training_schedule(seed):
  r = 11
  out, calls, case = _run_sim(jax.random.PRNGKey(seed), num_rounds=r)
  n = case[2].shape[0]
  for k in KEYS:
    assert out[k].shape == (r, n), k
  # One decoder in the program, for every round (round 0 without a mask input: _replay checks
  # what each round received).
  assert calls == [(n, SL, SL)]
  fl = _replay(out, case, r, every=False)
  added = (fl[:, 2:] != PAD_LABEL)  # (N, R - 1): slot r + 1 <-> round r
  assert not added[:, -1].any()  # round R - 1 adds nothing
  has_error_always = np.arange(n) != 5
  np.testing.assert_array_equal(added[has_error_always].sum(1), r - 3)
  assert not added[5].any()
  np.testing.assert_array_equal(out['num_points'][:, 5], 0 if case[1][5, 0] == 2 else 1)
  # The skipped round (one of 1 .. R-2) differs across masks for this key.
  skipped = {int(np.argmin(a[:r - 2])) + 1 for a in added[has_error_always]}
  assert 1 <= min(skipped) and max(skipped) <= r - 2
  assert len(skipped) > 1


def test_simulate_schedule_depends_on_key():
  masks = []
  for seed in range(4):
    out, _, _ = _run_sim(jax.random.PRNGKey(seed), num_rounds=11)
    masks.append(out['labels'][:5, 2:] != PAD_LABEL)
  skipped = np.array([np.argmin(m[:, :9], axis=1) for m in masks])  # (keys, masks)
  assert len(np.unique(skipped)) > 1
  assert any(np.any(skipped[i] != skipped[0]) for i in range(1, 4))


def test_simulate_every_round_adds_point():
  r = 6
  out, calls, case = _run_sim(jax.random.PRNGKey(2), every=True, num_rounds=r)
  fl = _replay(out, case, r, every=True)
  first_points = ((case[1] == 0) | (case[1] == 1)).sum(1)
  for i in range(5):  # errors always exist: one more point per round
    assert (fl[i, 2:] != PAD_LABEL).all()
    np.testing.assert_array_equal(out['num_points'][:, i], first_points[i] + np.arange(r))
  # Mask 5 has an empty region, so never an error to click on.
  assert (fl[5, 2:] == PAD_LABEL).all()
  np.testing.assert_array_equal(out['num_points'][:, 5], first_points[5])
  # Both kinds of clicks occur.
  lab = fl[:5, 2:]
  assert (lab == 1).any() and (lab == 0).any()


def test_simulate_remat_same_result():
  a, _, _ = _run_sim(jax.random.PRNGKey(3), num_rounds=11)
  b, _, _ = _run_sim(jax.random.PRNGKey(3), num_rounds=11, remat=True)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_simulate_no_gradient_between_rounds():
  """The fed-back logits are constants: w scales only round 0's logits, which reach the later
  rounds only through the fed-back mask input, so the later rounds' losses have zero derivative."""
  coords, labels, targets, region = _sim_case()

  def losses_of(w):
    def decode(c, l, m, given, k):
      logits, iou = fake_decode(c, l, jnp.where(given, m, -1.0), jnp)
      return jnp.where(given, logits, logits * w), iou

    out = pr.simulate(decode, jax.random.PRNGKey(0), jnp.asarray(coords), jnp.asarray(labels),
                      jnp.asarray(targets), jnp.asarray(region), image_size=SIMG, num_rounds=3)
    return out['loss']  # (R, N)

  d = np.asarray(jax.jit(jax.jacfwd(losses_of))(jnp.float32(1.0)))
  assert d.shape == (3, 6)
  assert np.all(d[0] != 0)
  np.testing.assert_array_equal(d[1:], 0.0)
