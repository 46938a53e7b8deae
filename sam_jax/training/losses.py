"""SAM's training losses (paper, Appendix A): focal x 20 + dice on the best of the output masks,
plus the MSE between the IoU head and the real IoU.

Shapes: N masks, K decoder outputs each (3 with multimask output, 1 otherwise, or all 4 with a
``allowed`` mask saying which count), L x L low-res logits. Every loss is a mean over pixels
(focal) or a ratio of sums (dice), per output, in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Elementwise binary cross-entropy of sigmoid(logits) against targets in [0, 1], stable."""
  return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = 0.25,
                       gamma: float = 2.0) -> jax.Array:
  """(..., L, L) logits and {0, 1} targets -> (...) focal loss, mean over pixels (RetinaNet's)."""
  logits = logits.astype(jnp.float32)
  t = targets.astype(jnp.float32)
  p = jax.nn.sigmoid(logits)
  ce = _bce_with_logits(logits, t)
  p_t = p * t + (1 - p) * (1 - t)
  loss = ce * (1 - p_t) ** gamma
  if alpha >= 0:
    loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
  return loss.mean(axis=(-2, -1))


def dice_loss(logits: jax.Array, targets: jax.Array, smooth: float = 1.0) -> jax.Array:
  """(..., L, L) -> (...): 1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s) with p = sigmoid(logits)."""
  p = jax.nn.sigmoid(logits.astype(jnp.float32))
  t = targets.astype(jnp.float32)
  inter = (p * t).sum(axis=(-2, -1))
  return 1 - (2 * inter + smooth) / (p.sum(axis=(-2, -1)) + t.sum(axis=(-2, -1)) + smooth)


def mask_iou(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """IoU of the thresholded logits (> 0) with the targets, (..., L, L) -> (...); 1 when both are
  empty."""
  pred = logits > 0
  t = targets.astype(bool)
  inter = (pred & t).sum(axis=(-2, -1)).astype(jnp.float32)
  union = (pred | t).sum(axis=(-2, -1)).astype(jnp.float32)
  return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)


def sam_loss(logits: jax.Array, iou_pred: jax.Array, targets: jax.Array, allowed: jax.Array,
             focal_weight: float = 20.0, dice_weight: float = 1.0, iou_weight: float = 1.0
             ) -> dict[str, jax.Array]:
  """Per-mask losses of one round.

  logits (N, K, L, L), iou_pred (N, K), targets (N, L, L) bool, allowed (N, K) bool: the outputs
  that count for each mask (at least one). The mask loss is focal_weight * focal + dice_weight *
  dice of the allowed output with the lowest such loss (only it gets gradients); the IoU loss is
  the mean over the allowed outputs of (iou_pred - true IoU)^2, the true IoU taken as a constant.
  Returns (N,) arrays: loss (mask + iou_weight * iou), focal, dice, iou_mse (of the chosen
  output for focal and dice), best (the chosen output's index), iou (its true IoU) and
  iou_oracle (the highest true IoU of the allowed outputs).
  """
  t = targets[:, None]  # (N, 1, L, L)
  focal = sigmoid_focal_loss(logits, t)  # (N, K)
  dice = dice_loss(logits, t)
  mask_loss = focal_weight * focal + dice_weight * dice
  best = jnp.argmin(jnp.where(allowed, mask_loss, jnp.inf), axis=1)  # (N,)
  pick = lambda x: jnp.take_along_axis(x, best[:, None], axis=1)[:, 0]
  true_iou = jax.lax.stop_gradient(mask_iou(logits, t))  # (N, K)
  sq = jnp.square(iou_pred.astype(jnp.float32) - true_iou)
  iou_mse = jnp.where(allowed, sq, 0).sum(1) / jnp.maximum(allowed.sum(1), 1)
  return {'loss': pick(mask_loss) + iou_weight * iou_mse, 'focal': pick(focal),
          'dice': pick(dice), 'iou_mse': iou_mse, 'best': best, 'iou': pick(true_iou),
          'iou_oracle': jnp.where(allowed, true_iou, 0.0).max(1)}


def grouping_loss(embedding: jax.Array, masks: jax.Array, scale: float = 10.0) -> jax.Array:
  """An auxiliary loss on the image embedding (not in the paper): each mask's tokens should point
  the way of the mask's mean direction, and every other token away from it.

  embedding (B, g, g, C), masks (B, M, L, L) with L a multiple of g -> (B, M). Each mask is pooled
  to the token grid (f = the fraction of each token it covers) and its prototype is the unit mean
  of the unit token embeddings weighted by f; a token's logit is ``scale * (cos - 1/2)`` with the
  prototype, scored against f by BCE (mean over tokens) + dice. An empty mask gives a zero
  prototype and a small, finite loss.
  """
  b, g = embedding.shape[:2]
  m, low = masks.shape[1], masks.shape[-1]
  f = low // g
  frac = masks.astype(jnp.float32).reshape(b, m, g, f, g, f).mean((3, 5))  # (B, M, g, g)
  unit = lambda x: x * jax.lax.rsqrt((x * x).sum(-1, keepdims=True) + 1e-6)  # finite grad at 0
  e = unit(embedding.astype(jnp.float32))
  proto = unit(jnp.einsum('bmhw,bhwc->bmc', frac, e))
  logits = scale * (jnp.einsum('bhwc,bmc->bmhw', e, proto) - 0.5)  # (B, M, g, g)
  return _bce_with_logits(logits, frac).mean((-2, -1)) + dice_loss(logits, frac)
