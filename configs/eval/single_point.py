"""Single point valid mask evaluation (SAM paper, Section 7.1): mIoU after 1, 2, 3, 5, 9 clicks.

Build the datasets once (COCO / LVIS JSON + images, or SA-1B-format folders; the paper's other
datasets in COCO format the same way), then evaluate any checkpoint the model registry reads:

  python -m sam_jax.data.build coco --name coco2017 \
      --annotations validation=/coco/annotations/instances_val2017.json --images /coco/val2017
  python -m sam_jax.data.build coco --name lvis_v1 \
      --annotations validation=/lvis/lvis_v1_val.json --images /coco
  python eval.py --config=configs/eval/single_point.py:vit_h \
      --config.checkpoint=sam_vit_h_4b8939.pth --workdir=out/eval_vit_h
  python eval.py --config=configs/eval/single_point.py --config.checkpoint=out/finetune \
      --workdir=out/eval_finetune    # a training workdir or orbax dir names its model itself
  ... --config.datasets=coco_format/coco2017:validation,sa1b:train[99%:]   # other datasets

Both first-click variants run (the mask's center, and a seeded random pixel of the mask); the
image is encoded once for both. Datasets over 15k masks are subsampled to 10k (fixed seed).
"""
from sam_jax.evaluation.config import default_config


def get_config(arg: str = ''):
  c = default_config()
  c.model = arg  # 'vit_h' / 'vit_l' / 'vit_b' for an official .pth; '' from an orbax checkpoint
  c.model_dtype = 'float32'
  c.datasets = 'coco_format/coco2017:validation,coco_format/lvis_v1:validation'
  c.single_point.first_points = 'center,random'
  return c
