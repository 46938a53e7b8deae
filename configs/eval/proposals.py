"""Object proposals (SAM paper, Section 7.3): class-agnostic mask AR@1000 on LVIS v1 val from the
automatic mask generator with a 64x64 grid, NMS 0.9, no IoU / stability filter, the top 1000 by
the mean of predicted IoU and stability (``sam_jax.evaluation.proposals``).

  python eval.py --config=configs/eval/proposals.py:vit_h --config.checkpoint=sam_vit_h_4b8939.pth \\
      --workdir=out/proposals_vit_h

On an accelerator: 4096 prompts an image (~20k images in LVIS v1 val); every process evaluates its
share of the images on each of its devices (see eval.py for multi-host flags).
"""
from sam_jax.evaluation.config import default_config


def get_config(arg: str = ''):
  c = default_config()
  c.model = arg  # 'vit_h' / 'vit_l' / 'vit_b' for an official .pth; '' from an orbax checkpoint
  c.model_dtype = 'float32'
  c.datasets = 'coco_format/lvis_v1:validation'
  c.protocols = 'proposals'
  return c
