"""SAM ViT-H on SA-1B with the paper's recipe (numbers in sam_jax/training/config.py RECIPES).

  # check before launching (any machine with the tpu extra), then on every worker of the slice:
  python train.py --config=configs/sam_vit_h.py:v5p-128 --compile_only --topology=v5p-128
  python train.py --config=configs/sam_vit_h.py:v5p-128 --workdir=gs://bucket/sam_vit_h \
      --config.data.data_dir=gs://bucket/tensorflow_datasets
  python train.py --config=configs/sam_vit_h.py:cpu --workdir=/tmp/sam_vit_h   # toy sizes, any machine

The paper's global batch (config.global_batch_size) is shared among the processes, one per host.
':SLICE' (v5p-128, v5p-256) adds the mesh, microbatches and remat policy that fit that batch on the
slice (POD_LAYOUTS in sam_jax/training/config.py; compiled figures in the README).
The paper starts from an MAE-pretrained ViT-H: pass it with --config.init_checkpoint.
"""
from sam_jax.training.config import paper_config


def get_config(arg: str = ''):
  return paper_config('vit_h', arg)
