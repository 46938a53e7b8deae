"""Instance segmentation from detector boxes (SAM paper, Section 7.4): mask AP on COCO 2017 val and
LVIS v1 val, each box a prompt plus one refinement pass (``sam_jax.evaluation.instances``).

The paper prompts with ViTDet-H's boxes; any detector's COCO results JSON works, one per dataset:

  python eval.py --config=configs/eval/instances.py:vit_h --config.checkpoint=sam_vit_h_4b8939.pth \\
      --config.instances.boxes=coco_format/coco2017:validation=vitdet_h_coco.json,\\
coco_format/lvis_v1:validation=vitdet_h_lvis.json --workdir=out/instances_vit_h
  ... --config.instances.boxes=ground_truth     # the masks' own boxes: no detector needed

Build the datasets first (``python -m sam_jax.data.build coco ...``, see the README).
"""
from sam_jax.evaluation.config import default_config


def get_config(arg: str = ''):
  c = default_config()
  c.model = arg  # 'vit_h' / 'vit_l' / 'vit_b' for an official .pth; '' from an orbax checkpoint
  c.datasets = 'coco_format/coco2017:validation,coco_format/lvis_v1:validation'
  c.protocols = 'instances'
  return c
