"""Fine-tune SAM on a COCO-format dataset, starting from an official or converted checkpoint.

  python -m sam_jax.data.build coco --name mydata \
      --annotations train=ann/train.json,validation=ann/val.json --images images/
  python train.py --config=configs/finetune_coco.py:vit_b,mydata --workdir=out/finetune \
      --config.init_checkpoint=sam_vit_b_01ec64.pth         # or HF safetensors / orbax / workdir

By default only the prompt encoder and the mask decoder train (``trainable='decoder'``): the image
encoder gets no gradients and no optimizer state, and runs once per image. Pass
``--config.trainable=all`` to train everything (then layer decay and drop path apply).
"""
from sam_jax.training.config import default_config


def get_config(arg: str = 'vit_b,default'):
  model, name = (arg.split(',') + ['default'])[:2]
  c = default_config()
  c.model = model
  c.data.dataset = f'coco_format/{name}'
  c.data.batch_size = 2
  c.trainable = 'decoder'
  c.num_steps = 5_000
  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_steps = 100
  c.optimizer.decay_steps = (4_000,)
  c.drop_path_rate = 0.1
  c.decoder_dropout = 0.0
  c.checkpoint_every_steps = 500
  c.eval_every_steps = 1_000
  c.eval_max_batches = 50
  return c
