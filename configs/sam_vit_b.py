"""SAM ViT-B on SA-1B with the paper's recipe (numbers in sam_jax/training/config.py RECIPES).

  python train.py --config=configs/sam_vit_b.py --workdir=gs://bucket/sam_vit_b \
      --config.data.data_dir=gs://bucket/tensorflow_datasets --config.data.batch_size=IMAGES_PER_HOST
  python train.py --config=configs/sam_vit_b.py:cpu --workdir=/tmp/sam_vit_b   # toy sizes, any machine

data.batch_size is per process: the paper's global batch divided by the number of processes. The
paper starts from an MAE-pretrained ViT-B: pass it with --config.init_checkpoint.
"""
from sam_jax.training.config import paper_config


def get_config(arg: str = ''):
  return paper_config('vit_b', arg)
