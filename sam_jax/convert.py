"""Convert official (.pth) or Hugging Face (safetensors) SAM weights to this project's orbax form.

  python -m sam_jax.convert --model-type vit_b --checkpoint sam_vit_b_01ec64.pth --output ckpt/vit_b

The output directory loads with ``sam_model_registry["vit_b"](checkpoint="ckpt/vit_b")`` and needs
neither PyTorch nor the original file.
"""
from __future__ import annotations

import argparse
import sys

from flax import nnx

from sam_jax.build_sam import sam_model_registry
from sam_jax.checkpoints import orbax_io


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m sam_jax.convert', description=__doc__.split('\n')[0])
  parser.add_argument('--model-type', required=True, choices=sorted(sam_model_registry))
  parser.add_argument('--checkpoint', required=True, help='.pth file, HF model.safetensors or dir')
  parser.add_argument('--output', required=True, help='directory to write (created)')
  args = parser.parse_args(argv)
  sam = sam_model_registry[args.model_type](checkpoint=args.checkpoint)
  path = orbax_io.save(args.output, sam.config, nnx.state(sam))
  print(f'wrote {args.model_type} checkpoint to {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
