"""SAM ViT-B on SA-1B with the paper's recipe (numbers in sam_jax/training/config.py RECIPES).

  # check before launching (any machine with the tpu extra), then on every worker of the slice:
  python train.py --config=configs/sam_vit_b.py:v5e-64 --compile_only --topology=v5e-64
  python train.py --config=configs/sam_vit_b.py:v5e-64 --workdir=gs://bucket/sam_vit_b \
      --config.data.data_dir=gs://bucket/tensorflow_datasets
  python train.py --config=configs/sam_vit_b.py:cpu --workdir=/tmp/sam_vit_b   # toy sizes, any machine

The paper's global batch (config.global_batch_size) is shared among the processes, one per host.
':SLICE' (v5e-64) adds the mesh, microbatches and remat policy that fit that batch on the
slice (POD_LAYOUTS in sam_jax/training/config.py; compiled figures in the README).
The paper starts from an MAE-pretrained ViT-B: pass it with --config.init_checkpoint.
"""
from sam_jax.training.config import paper_config


def get_config(arg: str = ''):
  return paper_config('vit_b', arg)
