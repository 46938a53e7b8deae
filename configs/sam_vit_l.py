"""SAM ViT-L on SA-1B with the paper's recipe (numbers in sam_jax/training/config.py RECIPES).

  python train.py --config=configs/sam_vit_l.py --workdir=gs://bucket/sam_vit_l \
      --config.data.data_dir=gs://bucket/tensorflow_datasets
  python train.py --config=configs/sam_vit_l.py:cpu --workdir=/tmp/sam_vit_l   # toy sizes, any machine

The paper's global batch (config.global_batch_size) is shared among the processes, one per host.
The paper starts from an MAE-pretrained ViT-L: pass it with --config.init_checkpoint.
"""
from sam_jax.training.config import paper_config


def get_config(arg: str = ''):
  return paper_config('vit_l', arg)
