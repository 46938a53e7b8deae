"""Simulated interactive prompting (SAM paper, Appendix A), on device, for N masks at once.

Round 0 decodes the first prompt from the input pipeline (a point, or a noisy box) with no mask
prompt. Each later round feeds back the previous round's low-res logits of its most confident
output and, in 8 of the 10 later rounds, adds one point sampled uniformly from the previous
prediction's error region: positive on a false negative, negative on a false positive. The two
rounds without a new point are one at a random position among the sampled ones and the last.

Prompt slots, per mask (T = num_rounds + 1): [first prompt (2 slots), one slot per later round].
A slot whose round adds no point holds ``PAD_LABEL``, which the decoder leaves out of attention.
The decoder produces all 4 outputs; a mask prompted by a single point (no box) counts the 3
multimask outputs, any other the single-output token.

Gradients do not flow from one round into the next (the fed-back logits are a constant): the
sampled points are not differentiable anyway, and cutting the chain lets each round be
rematerialised (``remat=True``) so the backward pass keeps only the (N, L, L) logits carried between
rounds instead of every round's decoder activations (11x the decoder memory).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from sam_jax.modeling.prompt_encoder import PAD_LABEL
from sam_jax.training import losses

NUM_ROUNDS = 11

# decode(coords (N, T, 2), labels (N, T), mask_input (N, L, L), mask_given () bool, key) ->
#   logits (N, 4, L, L), iou_pred (N, 4); mask_given False: no mask prompt (the official None)
DecodeFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array],
                    tuple[jax.Array, jax.Array]]


def image_region(input_size: jax.Array, low_res: int, image_size: int) -> jax.Array:
  """(B, 2) (h, w) of each resized image -> (B, L, L) bool: low-res cells inside the image."""
  cell = jnp.arange(low_res) * (image_size // low_res)
  rows = cell[None, :] < input_size[:, :1]  # (B, L)
  cols = cell[None, :] < input_size[:, 1:]
  return rows[:, :, None] & cols[:, None, :]


def sample_error_points(key: jax.Array, logits: jax.Array, targets: jax.Array, region: jax.Array,
                        image_size: int) -> tuple[jax.Array, jax.Array]:
  """One point per mask, uniform over its error region (inside ``region``).

  logits (N, L, L), targets / region (N, L, L) bool -> coords (N, 2) [x, y] at the centre of the
  chosen low-res cell in the input frame, labels (N,): 1 on a false negative, 0 on a false
  positive, ``PAD_LABEL`` where the prediction has no error.
  """
  n, low, _ = targets.shape
  pred = logits > 0
  false_neg = targets & ~pred
  error = (false_neg | (pred & ~targets)) & region
  score = jnp.where(error, jax.random.uniform(key, error.shape), -1.0).reshape(n, -1)
  idx = jnp.argmax(score, axis=1)  # (N,): uniform among error cells (ties have probability 0)
  y, x = idx // low, idx % low
  scale = image_size / low
  coords = jnp.stack([x, y], axis=1).astype(jnp.float32) * scale + (scale - 1) / 2  # cell centre
  has_error = error.reshape(n, -1).any(axis=1)
  is_fn = false_neg.reshape(n, -1)[jnp.arange(n), idx]
  labels = jnp.where(has_error, is_fn.astype(jnp.int32), PAD_LABEL)
  return jnp.where(has_error[:, None], coords, 0.0), labels


def point_rounds(key: jax.Array, num_masks: int, num_rounds: int = NUM_ROUNDS) -> jax.Array:
  """(num_rounds, N) bool: whether round r adds a sampled point to mask n.

  Round 0 is the first prompt (False); of rounds 1 .. R-2 all but one, drawn uniformly per mask,
  add a point; round R-1 adds none.
  """
  if num_rounds < 3:
    return jnp.zeros((num_rounds, num_masks), bool)
  skip = jax.random.randint(key, (num_masks,), 1, num_rounds - 1)  # (N,) in [1, R-2]
  r = jnp.arange(num_rounds)[:, None]
  return (r >= 1) & (r <= num_rounds - 2) & (r != skip[None])


def allowed_outputs(labels: jax.Array) -> jax.Array:
  """(N, T) labels -> (N, 4) bool: the 3 multimask outputs for a lone point, else output 0."""
  n_points = ((labels == 0) | (labels == 1)).sum(axis=1)
  has_box = (labels == 2).any(axis=1)
  multi = (n_points == 1) & ~has_box  # (N,)
  token = jnp.arange(4)[None]
  return jnp.where(multi[:, None], token >= 1, token == 0)


def most_confident(logits: jax.Array, iou_pred: jax.Array, allowed: jax.Array) -> jax.Array:
  """(N, 4, L, L), (N, 4), (N, 4) -> (N, L, L): the allowed output with the highest IoU prediction."""
  best = jnp.argmax(jnp.where(allowed, iou_pred, -jnp.inf), axis=1)
  return jnp.take_along_axis(logits, best[:, None, None, None], axis=1)[:, 0]


def simulate(decode: DecodeFn, key: jax.Array, first_coords: jax.Array, first_labels: jax.Array,
             targets: jax.Array, region: jax.Array, *, image_size: int,
             num_rounds: int = NUM_ROUNDS, loss_weights: dict[str, float] | None = None,
             remat: bool = False, every_round_adds_point: bool = False) -> dict[str, jax.Array]:
  """Runs the rounds; returns per-round, per-mask (R, N) arrays of ``losses.sam_loss``'s outputs
  plus 'num_points' and 'iou_confident' (the IoU of the most confident allowed output, the one
  fed back), and 'coords' (N, T, 2) / 'labels' (N, T), the final prompts.

  first_coords (N, 2, 2), first_labels (N, 2) from the pipeline; targets (N, L, L) bool; region
  (N, L, L) bool, where points may be sampled (the image, not its padding);
  every_round_adds_point: evaluation's schedule (round r has r + 1 points after a first point),
  also training's with ``config.point_every_round``.
  """
  n = targets.shape[0]
  weights = loss_weights or {}
  key_schedule, key_rounds = jax.random.split(key)
  if every_round_adds_point:
    adds_point = jnp.ones((num_rounds, n), bool)
  else:
    adds_point = point_rounds(key_schedule, n, num_rounds)  # (R, N)
  t = num_rounds + 1
  coords = jnp.zeros((n, t, 2), jnp.float32).at[:, :2].set(first_coords)
  labels = jnp.full((n, t), PAD_LABEL, jnp.int32).at[:, :2].set(first_labels)

  def decode_round(r, coords, labels, mask_input):
    logits, iou_pred = decode(coords, labels, mask_input, r > 0,
                              jax.random.fold_in(key_rounds, 2 * r))
    allowed = allowed_outputs(labels)
    out = losses.sam_loss(logits, iou_pred, targets, allowed, **weights)
    out['num_points'] = ((labels == 0) | (labels == 1)).sum(axis=1)
    fed_back = jax.lax.stop_gradient(most_confident(logits, iou_pred, allowed))
    out['iou_confident'] = losses.mask_iou(fed_back, targets)
    return fed_back, out

  def body(carry, xs):
    coords, labels, prev = carry
    r, adds = xs
    # Round r > 0 fills prompt slot r + 1 (round 0 keeps its slots: the first prompt's).
    point, label = sample_error_points(jax.random.fold_in(key_rounds, 2 * r + 1), prev, targets,
                                       region, image_size)
    adds = adds & (r > 0)
    coords = coords.at[:, r + 1].set(jnp.where(adds[:, None], point, coords[:, r + 1]))
    labels = labels.at[:, r + 1].set(jnp.where(adds, label, labels[:, r + 1]))
    prev, out = decode_round(r, coords, labels, prev)
    return (coords, labels, prev), out

  if remat:
    body = jax.checkpoint(body)
  # Every round in one scan, round 0 included (no mask input there: decode's mask_given is
  # False), so the decoder and its gradient are compiled once, not once more for round 0.
  prev = jnp.zeros(targets.shape, jnp.float32)
  (coords, labels, _), out = jax.lax.scan(body, (coords, labels, prev),
                                          (jnp.arange(num_rounds), adds_point))
  out['coords'], out['labels'] = coords, labels
  return out
