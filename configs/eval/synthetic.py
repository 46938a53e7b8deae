"""The zero-shot protocols on the built-in synthetic shapes' validation split (built on first use,
no download): the CPU-sized check that a trained tiny model segments what it is shown.

  python train.py --config=configs/tiny.py --workdir=out/tiny
  python eval.py --config=configs/eval/synthetic.py --config.checkpoint=out/tiny \\
      --workdir=out/tiny_eval
  python eval.py --config=configs/eval/synthetic.py:smoke --workdir=/tmp/smoke  # random vit_tiny

Single point (both first-click variants), instances from the masks' own boxes (the shapes have no
detector: an oracle box per mask, so the AP measures the masks alone), and object proposals from a
16x16 grid (the paper's 64x64 takes ~16x longer on a CPU).
"""
from sam_jax.evaluation.config import default_config


def get_config(arg: str = ''):
  c = default_config()
  c.model = ''                       # read from the checkpoint (training workdir / orbax dir)
  c.datasets = 'synthetic_shapes:validation'
  c.max_images = 50
  c.protocols = 'single_point,instances,proposals'
  c.single_point.first_points = 'center,random'
  c.instances.boxes = 'ground_truth'
  c.proposals.points_per_side = 16
  if arg == 'smoke':                 # random weights, a few images: checks the program, not a model
    c.model = 'vit_tiny'
    c.max_images = 4
    c.single_point.num_points = 3
    c.proposals.points_per_side = 4
  elif arg:
    raise ValueError(f'unknown config argument {arg!r} (expected "" or "smoke")')
  return c
