"""SAM's train step, from a batch of the input pipeline to the parameter update, in one place.

  batch (B images, M masks each; layout in ``sam_jax/data/pipeline.py``)
  -> image encoder, once per image (drop path, remat policy)        -> (B, g, g, C)
  -> the embedding of each image repeated for its M masks            -> (N = B * M, g, g, C)
  -> 11 rounds of prompt encoder + mask decoder (``prompt_rounds``)  -> per round, per mask losses
  -> loss = mean over rounds of the mean over valid masks of
            20 * focal + dice (best allowed output) + IoU-head MSE
            (+ ``grouping_loss_weight`` x ``losses.grouping_loss`` of the image embedding, off
            in the paper's recipes)
  -> gradients of the trainable parameters only -> optax update (AdamW, layer decay, schedule)

The state is a dict of pytrees, the unit of sharding, donation and checkpointing:
  step ()         int32
  params          nnx.State of the trainable parameters (``config.trainable``)
  frozen          nnx.State of everything else (frozen parameters, buffers): no gradient, no
                  optimizer state
  opt_state       optax state of ``params`` (same logical axes, same shardings)
  rng             a PRNG key; the step's key is ``fold_in(rng, step)``, so a resumed run draws
                  exactly what the uninterrupted one would
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from sam_jax.errors import ConfigError
from sam_jax.modeling.config import PIXEL_MEAN, PIXEL_STD
from sam_jax.training import losses, prompt_rounds

State = dict[str, Any]

# What `config.trainable` may say: everything, or the prompt encoder + mask decoder (the usual
# domain fine-tune; the encoder then runs without gradients).
TRAINABLE = {
    'all': nnx.Param,
    'decoder': nnx.All(nnx.Param, lambda path, _: path[0] != 'image_encoder'),
}
ROUND_TERMS = ('loss', 'focal', 'dice', 'iou_mse', 'iou', 'iou_confident')


def split_model(model: nnx.Module, trainable: str):
  """(graphdef, trainable params, frozen rest) of a Sam model."""
  if trainable not in TRAINABLE:
    raise ConfigError(f'config.trainable {trainable!r}: choose one of {sorted(TRAINABLE)}')
  return nnx.split(model, TRAINABLE[trainable], ...)


def prepare_images(images: jax.Array) -> jax.Array:
  """Pipeline images -> model input: uint8 (``normalize=False``) is normalised here, on device.
  The padding stays zero after normalising, as in the official preprocess."""
  if images.dtype != jnp.uint8:
    return images
  x = (images.astype(jnp.float32) - jnp.array(PIXEL_MEAN)) / jnp.array(PIXEL_STD)
  return jnp.where((images == 0).all(-1, keepdims=True), 0.0, x)


def forward_rounds(model, batch: dict[str, jax.Array], key: jax.Array,
                   config: ml_collections.ConfigDict, *, train: bool) -> dict[str, jax.Array]:
  """The encoder once per image, then the prompt rounds over every mask: (R, N) terms, and in
  training with ``config.grouping_loss_weight`` the (N,) 'grouping' loss of each mask."""
  cfg = model.config
  k_encoder, k_rounds = jax.random.split(key)
  encoder_trainable = config.trainable == 'all'
  emb = model.image_encoder(prepare_images(batch['image']),
                            drop_path_rate=config.drop_path_rate if train else 0.0,
                            rng=k_encoder, remat=config.remat if train else 'none')
  if not (train and encoder_trainable):
    emb = jax.lax.stop_gradient(emb)
  b, m = batch['mask_valid'].shape
  grouping = (losses.grouping_loss(emb, batch['masks']).reshape(b * m)
              if train and encoder_trainable and config.grouping_loss_weight else None)
  emb = jnp.repeat(emb, m, axis=0)  # (B * M, g, g, C): image i's embedding for each of its masks
  image_pe = model.prompt_encoder.get_dense_pe()
  rate = config.decoder_dropout if train else 0.0

  def decode_masks(emb, coords, labels, mask_input, k, mask_given):
    return model.decode(emb, coords, labels, mask_input, multimask_output='all',
                        image_pe=image_pe, drop=(k, rate) if rate else None, mask_given=mask_given)

  n = b * m
  chunk = config.decoder_mask_chunk if train and config.decoder_mask_chunk else n
  if chunk < 0 or n % chunk:
    raise ConfigError(f'config.decoder_mask_chunk={chunk} must divide the {n} masks of a '
                      f'(micro)batch ({b} images x {m} masks)')

  def decode(coords, labels, mask_input, mask_given, k):
    if chunk == n:
      return decode_masks(emb, coords, labels, mask_input, k, mask_given)
    # (N, ...) -> (N / chunk, chunk, ...) as microbatches are split (every device keeps its share
    # of each chunk): one rematerialised decoder pass per chunk, so the backward pass holds one
    # chunk's activations at a time; dropout draws per chunk.
    c = n // chunk
    xs = split_microbatches((emb, coords, labels, mask_input), c)
    outs = jax.lax.map(jax.checkpoint(lambda x: decode_masks(*x, mask_given)),
                       (*xs, jax.random.split(k, c)))
    # (c, chunk, ...) -> (N, ...): the inverse of the split, mask j back at row j
    return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1).reshape(n, *a.shape[2:]), outs)

  low = cfg.low_res_size
  region = jnp.repeat(prompt_rounds.image_region(batch['input_size'], low, cfg.image_size), m, 0)
  out = prompt_rounds.simulate(
      decode, k_rounds, batch['prompt_coords'].reshape(b * m, 2, 2),
      batch['prompt_labels'].reshape(b * m, 2), batch['masks'].reshape(b * m, low, low), region,
      image_size=cfg.image_size, num_rounds=config.num_rounds if train else config.eval_rounds,
      loss_weights=dict(config.loss), remat=config.round_remat and train,
      every_round_adds_point=config.point_every_round or not train)
  if grouping is not None:
    out['grouping'] = grouping
  return out


def split_microbatches(batch, k: int):
  """(B, ...) leaves -> (k, B / k, ...): microbatch i holds items i, i + k, i + 2k, ..., so a
  batch split over devices in contiguous blocks gives every device its share of each microbatch
  (no data moves between devices). Also splits the decoder's masks into chunks."""
  def one(x):
    b = x.shape[0]
    return jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)
  return jax.tree.map(one, batch)


def make_train_step(graphdef, config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, grad_shardings=None, batch_sharding=None
                    ) -> Callable[[State, dict], tuple[State, dict]]:
  """train_step(state, batch) -> (state, metrics): pure, to be jitted with donated state.

  ``config.microbatches`` = k > 1 runs the batch as k microbatches in a ``lax.scan``, summing
  their gradients, then makes one update: activations of B / k images at a time, one
  gradient-sized accumulator (kept in ``grad_shardings``, the parameters' shardings; each
  microbatch is constrained to ``batch_sharding``). Every microbatch's loss is divided by the
  valid masks of the whole batch, so the sum is the full batch's loss; with a deterministic
  forward (no dropout / drop path, one round) the update equals the k = 1 step's."""
  k = config.get('microbatches', 1)
  if config.grouping_loss_weight and config.trainable != 'all':
    logging.getLogger('sam_jax.train').warning(
        'config.grouping_loss_weight is ignored: it trains the image encoder, which '
        'config.trainable=%r freezes', config.trainable)

  def loss_fn(params, frozen, batch, key, denominator):
    model = nnx.merge(graphdef, params, frozen)
    out = forward_rounds(model, batch, key, config, train=True)
    w = batch['mask_valid'].reshape(-1).astype(jnp.float32)
    per_round = {t: (out[t] * w).sum(-1) / denominator for t in ROUND_TERMS}  # (R,) each
    loss, extra = per_round['loss'].mean(), {}
    if 'grouping' in out:
      extra['grouping_loss'] = (out['grouping'] * w).sum() / denominator
      loss = loss + config.grouping_loss_weight * extra['grouping_loss']
    return loss, (per_round, extra)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def gradients(params, frozen, batch, key):
    """((loss, per-round terms), grads) of the whole batch, in k microbatches."""
    denominator = jnp.maximum(batch['mask_valid'].sum().astype(jnp.float32), 1.0)
    if k == 1:
      return grad_fn(params, frozen, batch, key, denominator)
    constrain = lambda tree, s: tree if s is None else jax.lax.with_sharding_constraint(tree, s)

    def body(total, xs):
      i, micro = xs
      micro = constrain(micro, batch_sharding)
      out = grad_fn(params, frozen, micro, jax.random.fold_in(key, i), denominator)
      total = jax.tree.map(jnp.add, total, out)
      return (total[0], constrain(total[1], grad_shardings)), None

    micro = split_microbatches(batch, k)
    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                         jax.eval_shape(grad_fn, params, frozen, first, key, denominator))
    zeros = (zeros[0], constrain(zeros[1], grad_shardings))
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
    return total

  def train_step(state: State, batch: dict[str, jax.Array]) -> tuple[State, dict]:
    step = state['step']
    key = jax.random.fold_in(state['rng'], step)
    (loss, (per_round, extra)), grads = gradients(state['params'], state['frozen'], batch, key)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    grad_norm = optax.global_norm(grads)
    # The new parameters too: an update can overflow while the loss is still finite. One pass per
    # leaf gives both the norm and the check: NaN where an element is not finite (a sum of
    # squares of large but finite parameters overflows to inf, not NaN).
    param_sq = sum(jnp.sum(jnp.where(jnp.isfinite(p), jnp.square(p), jnp.nan))
                   for p in jax.tree.leaves(params))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & ~jnp.isnan(param_sq)
    param_norm = jnp.sqrt(param_sq)
    if config.on_nonfinite == 'skip':  # keep the old parameters and optimizer state
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      params, opt_state = keep(params, state['params']), keep(opt_state, state['opt_state'])
      param_norm = optax.global_norm(params)  # of those kept
    accum = config.optimizer.get('grad_accum_steps', 1)
    metrics = {
        'loss': loss, 'finite': finite, 'grad_norm': grad_norm,
        'update_norm': optax.global_norm(updates), 'param_norm': param_norm,
        'learning_rate': schedule(step // accum),
        'masks': batch['mask_valid'].sum(), 'images': (batch['image_id'] >= 0).sum(),
        **{f'round/{name}': v for name, v in per_round.items()}, **extra,
    }
    new_state = dict(state, step=step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, config: ml_collections.ConfigDict):
  """eval_step(params, frozen, batch) -> sums over valid masks of the IoU after each click
  (most confident and best output), and the mask count: one-point-first prompts, a new
  error-region point every round, no dropout, a fixed key."""

  def eval_step(params, frozen, batch):
    model = nnx.merge(graphdef, params, frozen)
    out = forward_rounds(model, batch, jax.random.PRNGKey(config.seed), config, train=False)
    w = batch['mask_valid'].reshape(-1).astype(jnp.float32)
    return {'iou_confident': (out['iou_confident'] * w).sum(-1),  # (R,)
            'iou_oracle': (out['iou_oracle'] * w).sum(-1), 'masks': w.sum()}

  return eval_step
