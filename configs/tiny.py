"""vit_tiny from scratch on the built-in synthetic shapes, sized for ~12 minutes on a 2-core CPU.

  python train.py --config=configs/tiny.py --workdir=out/tiny
  python train.py --config=configs/tiny.py:smoke --workdir=/tmp/smoke   # a few steps, for tests

The synthetic dataset (256 px, 2000 + 200 images) is built on first use, no download.
"""
from sam_jax.training.config import default_config


def get_config(arg: str = ''):
  c = default_config()
  c.model = 'vit_tiny'
  c.model_dtype = 'float32'         # the CPU has no fast bf16 matmuls through XLA
  c.data.dataset = 'synthetic_shapes'
  c.data.image_size = 256
  # Sized for ~12 minutes on 2 CPU cores: the decoder over every mask and round dominates the step
  # (bench/train_step.py), so fewer masks and 3 rounds (first prompt, one sampled point, one
  # without) instead of the recipe's 11.
  c.data.batch_size = 4
  c.data.max_masks = 8
  c.num_rounds = 3
  c.data.normalize = True
  c.num_steps = 600
  c.drop_path_rate = 0.0
  c.decoder_dropout = 0.0
  c.remat = 'none'
  c.round_remat = False
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 50
  c.optimizer.decay_steps = (500,)
  c.optimizer.layer_decay = 1.0
  c.optimizer.weight_decay = 0.05
  c.optimizer.grad_clip_norm = 1.0
  c.checkpoint_every_steps = 100
  c.log_every_steps = 25
  c.eval_max_batches = 25           # 100 held-out images
  if arg == 'smoke':
    c.num_steps = 4
    c.data.batch_size = 2
    c.data.max_masks = 4
    c.num_rounds = 4
    c.eval_rounds = 3
    c.checkpoint_every_steps = 2
    c.log_every_steps = 1
    c.eval_max_batches = 2
  return c
