"""The defaults every training config starts from (``configs/*.py`` override them).

Numbers are the SAM paper's (Appendix A) unless a comment says otherwise; see
``shared/reference/sam-recipe.md``. Every field can be set from the command line:
``python train.py --config=configs/sam_vit_b.py --config.optimizer.learning_rate=1e-4``.
"""
from __future__ import annotations

import dataclasses
import functools

import ml_collections

from sam_jax.data.config import InputConfig
from sam_jax.errors import ConfigError


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = 'vit_b'                 # a sam_jax VARIANTS name
  c.attention = 'auto'              # encoder attention (modeling.attention.IMPLEMENTATIONS); 'auto'
                                    # picks by the backend, and by the target with --compile_only
  c.model_dtype = 'bfloat16'        # compute dtype; parameters and optimizer state stay float32
  c.init_checkpoint = ''            # official .pth / HF safetensors / orbax dir / training workdir
  c.trainable = 'all'               # 'all' | 'decoder' (prompt encoder + mask decoder only)
  c.seed = 0                        # parameters, dropout, prompt simulation (data: data.seed)
  # Changes to a fresh model's initialisation (``sam_jax/training/scratch_init.py``); off here.
  c.scratch_init = ml_collections.ConfigDict(dict(tie_cross_attention_qk=0.0, neck_scale=1.0))

  c.data = ml_collections.ConfigDict(dataclasses.asdict(InputConfig()))  # per-process batch
  # Fields whose default is None become typed placeholders, so --config.data.x=... can set them.
  for name, kind in (('data_dir', str), ('num_epochs', int), ('box_noise_cap', float),
                     ('prefetch_buffer_size', int)):
    c.data[name] = ml_collections.config_dict.placeholder(kind)
  c.data.dataset = 'sa1b'
  c.data.batch_size = 1             # images per process; the global batch is this x processes
  c.global_batch_size = 0           # images per step over all processes; when set, it decides
                                    # and data.batch_size becomes global / processes
  c.microbatches = 1                # the step runs its batch in this many sequential pieces and
                                    # sums their gradients (one update): activations of
                                    # batch / microbatches images at a time
  c.data.normalize = False          # uint8 to the device (4x less host -> device), normalised there
  c.eval_data = ml_collections.ConfigDict()  # overrides of `data` for held-out evaluation
  c.eval_data.split = 'validation'
  c.eval_data.num_epochs = 1
  c.eval_data.shuffle = False
  c.eval_data.point_probability = 1.0  # evaluation starts every mask from one point,
  c.eval_data.point_mode = 'center'    # at its centre (the paper's protocol)

  c.num_steps = 90_000
  c.num_rounds = 11                 # 1 first prompt + 8 sampled points + 2 rounds without
  c.point_every_round = False       # True: every round after the first adds a point (no rounds
                                    # without one); for short schedules, in which the paper's
                                    # leaves none (2 rounds: first prompt, then its mask fed back)
  c.eval_rounds = 9                 # clicks in evaluation (mIoU at 1 .. eval_rounds points)
  c.loss = ml_collections.ConfigDict(dict(focal_weight=20.0, dice_weight=1.0, iou_weight=1.0))
  c.grouping_loss_weight = 0.0      # not in the paper: x losses.grouping_loss, which teaches the
                                    # image embedding one direction per object, from the masks
  c.drop_path_rate = 0.4            # the released code has none
  c.decoder_dropout = 0.1           # the released code has none
  c.remat = 'block'                 # encoder remat policy (image_encoder.REMAT_POLICIES)
  c.round_remat = True              # recompute each prompt round's decoder in the backward pass
  c.decoder_mask_chunk = 0          # > 0: the decoder runs over this many masks at a time, each
                                    # chunk recomputed in the backward pass (0: all); masks of the
                                    # whole (micro)batch: a multiple of the data x fsdp devices

  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=8e-4, warmup_steps=250, decay_steps=(60_000, 86_666), decay_factor=0.1,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, layer_decay=0.8,
      grad_clip_norm=0.0,           # 0: no clipping
      grad_accum_steps=1))          # micro-batches per update (global batch x this per update)
  c.on_nonfinite = 'stop'           # 'stop': end the run naming the step, keeping the last good
                                    # checkpoint; 'skip': keep the old parameters for that step

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the rest
  c.sharding_rules = ()             # extra (logical axis, mesh axes) rules before the defaults

  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.log_every_steps = 50
  c.eval_every_steps = 0            # 0: evaluate only at the end
  c.eval_max_batches = 0            # 0: the whole evaluation split
  c.peak_tflops = 0.0               # per device, for MFU; 0: guessed from the device kind
  return c


# Lower bounds of the count, weight and rate fields, checked before anything is built (``check``).
MINIMA = {
    'num_steps': 0, 'num_rounds': 1, 'eval_rounds': 1, 'global_batch_size': 0, 'microbatches': 1,
    'data.batch_size': 1, 'data.max_masks': 1, 'decoder_mask_chunk': 0, 'grouping_loss_weight': 0,
    'loss.focal_weight': 0, 'loss.dice_weight': 0, 'loss.iou_weight': 0,
    'optimizer.learning_rate': 0, 'optimizer.warmup_steps': 0, 'optimizer.weight_decay': 0,
    'optimizer.grad_clip_norm': 0, 'optimizer.grad_accum_steps': 1,
    'checkpoint_every_steps': 1, 'keep_checkpoints': 1, 'log_every_steps': 1,
    'eval_every_steps': 0, 'eval_max_batches': 0,
}
ON_NONFINITE = ('stop', 'skip')


def check(config: ml_collections.ConfigDict) -> None:
  """Raises a ConfigError naming every field out of its range (a zero batch, no prompt round, an
  unknown ``on_nonfinite``, ...): said at once, not as an error from deep inside a trace."""
  get = lambda name: functools.reduce(getattr, name.split('.'), config)
  problems = [f'{name}={get(name)} (at least {low})' for name, low in MINIMA.items()
              if get(name) < low]
  problems += [f'{name}={get(name)} (from 0 to below 1)' for name in
               ('drop_path_rate', 'decoder_dropout') if not 0 <= get(name) < 1]
  if config.on_nonfinite not in ON_NONFINITE:
    problems.append(f'on_nonfinite={config.on_nonfinite!r} (one of {ON_NONFINITE})')
  decays = list(config.optimizer.decay_steps)
  if decays != sorted(decays) or any(d < 0 for d in decays):
    problems.append(f'optimizer.decay_steps={tuple(decays)} (increasing steps)')
  if problems:
    raise ConfigError('invalid training config: config.' + '; config.'.join(problems))


# The paper's per-size recipe (Appendix A). ViT-B / ViT-L train twice as long at half the batch;
# their step decays are put at the ViT-H schedule's fractions (2/3 and 26/27 of the run).
RECIPES = {
    #         steps,   global batch, lr,   layer decay, drop path, step decays
    'vit_h': (90_000, 256, 8e-4, 0.8, 0.4, (60_000, 86_666)),
    'vit_l': (180_000, 128, 4e-4, 0.8, 0.4, (120_000, 173_333)),
    'vit_b': (180_000, 128, 8e-4, 0.6, 0.6, (120_000, 173_333)),
}


# How the paper's global batch is laid out on a slice, checked by compiling for it
# (``train.py --compile_only --topology=SLICE``; figures per chip in the README):
#   (model, slice): (data, fsdp, microbatches, encoder remat policy)
# Data parallel fits all three, so no FSDP all-gathers are paid: vit_h's 7.2 GiB of parameters and
# Adam state sit on every chip (--config.mesh.fsdp=4 would make that 1.8 GiB).
POD_LAYOUTS = {
    ('vit_h', 'v5p-128'): (-1, 1, 1, 'block'),   # 64 chips x 4 images: 34.3 of 95.7 GiB
    ('vit_h', 'v5p-256'): (-1, 1, 1, 'block'),   # 128 chips x 2 images: 21.5 of 95.7 GiB
    ('vit_b', 'v5e-64'): (-1, 1, 1, 'block'),    # 64 chips x 2 images: 11.3 of 15.75 GiB
}                                                # (7.7 GiB with --config.microbatches=2)


def paper_config(model: str, arg: str = '') -> ml_collections.ConfigDict:
  """``default_config`` with the paper's recipe for ``model`` on SA-1B. ``arg``: a slice of
  ``POD_LAYOUTS`` (e.g. 'v5p-128') sets its mesh, microbatches and remat policy; 'cpu': the same
  program at toy sizes (2 steps, 2 masks, 3 rounds), to check a launch command anywhere."""
  steps, batch, lr, layer_decay, drop_path, decays = RECIPES[model]
  c = default_config()
  c.model = model
  c.global_batch_size = batch       # shared among the processes (data.batch_size is derived)
  c.data.dataset = 'sa1b'
  c.num_steps = steps
  c.optimizer.learning_rate = lr
  c.optimizer.layer_decay = layer_decay
  c.optimizer.decay_steps = decays
  c.drop_path_rate = drop_path
  if arg == 'cpu':
    c.global_batch_size = 0         # data.batch_size (1) per process
    c.data.dataset = 'synthetic_shapes/s1024'  # built on first use, no download
    c.model_dtype = 'float32'
    c.num_steps = 2
    c.data.max_masks = 2
    c.num_rounds = 3
    c.eval_rounds = 2
    c.checkpoint_every_steps = 1
    c.eval_max_batches = 1
  elif (model, arg) in POD_LAYOUTS:
    c.mesh.data, c.mesh.fsdp, c.microbatches, c.remat = POD_LAYOUTS[model, arg]
  elif arg:
    pods = [p for m, p in POD_LAYOUTS if m == model]
    raise ConfigError(f'unknown config argument {arg!r} (expected "", "cpu" or a slice of '
                      f'{pods})')
  return c
