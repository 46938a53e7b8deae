"""Serving artifacts: the image encoder and the prompt encoder + mask decoder as ``jax.export``
programs with symbolic shapes, plus their weights.

  python -m sam_jax.export --model-type vit_b --checkpoint sam_vit_b_01ec64.pth --output export/vit_b

writes ``image_encoder.jax`` (images (b, S, S, 3) normalised and padded -> embeddings (b, g, g, C),
any batch b), ``prompt_decoder.jax`` (one image's embeddings (1, g, g, C), coords (n, t, 2) in the
input frame, labels (n, t), mask_input (n, L, L), has_mask (n,) -> low-res logits (n, 4, L, L) and
IoU predictions (n, 4) of all four mask tokens, for any n prompt sets of any length t), and
``weights.npz``. Loading them needs only jax and numpy (``load``), not this package's model code:
the official ONNX export covers the decoder only; this covers the encoder too.
Labels follow ``modeling.prompt_encoder`` (1 / 0 points, 2 / 3 box corners, -1 the official padding
point, -2 inert padding); multimask output is mask tokens 1..3, single output token 0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sam_jax.modeling.prompt_encoder import PAD_LABEL
from sam_jax.modeling.sam import Sam

ENCODER_FILE = 'image_encoder.jax'
DECODER_FILE = 'prompt_decoder.jax'
WEIGHTS_FILE = 'weights.npz'


def _decode_all_tokens(model: Sam, embeddings, coords, labels, mask_input, has_mask):
  """All four mask tokens, the mask prompt chosen per prompt set by has_mask (n,)."""
  pe = model.prompt_encoder
  sparse = pe.embed_points(coords, labels)
  no_mask = jnp.broadcast_to(pe.no_mask_embed.weight[0], (coords.shape[0],) + embeddings.shape[1:])
  dense = jnp.where(has_mask[:, None, None, None], pe.embed_masks(mask_input[..., None]), no_mask)
  decoder = model.mask_decoder
  masks = []
  for multimask in (False, True):  # token 0, then tokens 1..3
    masks.append(decoder(embeddings, pe.get_dense_pe(), sparse, dense, multimask,
                         labels != PAD_LABEL))
  return (jnp.concatenate([masks[0][0], masks[1][0]], 1),
          jnp.concatenate([masks[0][1], masks[1][1]], 1))


def export_model(model: Sam) -> tuple[jax.export.Exported, jax.export.Exported, list[np.ndarray]]:
  """(encoder, decoder) exported programs taking the weight leaves first, and the leaves."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  weights = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in leaves]
  cfg = model.config
  merge = lambda ls: nnx.merge(graphdef, jax.tree.unflatten(treedef, ls))
  b, n, t = jax.export.symbolic_shape('b, n, t')
  s, g, l, c = cfg.image_size, cfg.grid_size, cfg.low_res_size, cfg.prompt_embed_dim
  f32 = jnp.float32
  encoder = jax.export.export(jax.jit(lambda ls, x: merge(ls).embed_images(x)))(
      weights, jax.ShapeDtypeStruct((b, s, s, 3), f32))
  decoder = jax.export.export(jax.jit(lambda ls, *a: _decode_all_tokens(merge(ls), *a)))(
      weights, jax.ShapeDtypeStruct((1, g, g, c), f32), jax.ShapeDtypeStruct((n, t, 2), f32),
      jax.ShapeDtypeStruct((n, t), jnp.int32), jax.ShapeDtypeStruct((n, l, l), f32),
      jax.ShapeDtypeStruct((n,), jnp.bool_))
  return encoder, decoder, [np.asarray(x) for x in leaves]


def save(model: Sam, directory: str | Path) -> Path:
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  encoder, decoder, leaves = export_model(model)
  (directory / ENCODER_FILE).write_bytes(encoder.serialize())
  (directory / DECODER_FILE).write_bytes(decoder.serialize())
  np.savez(directory / WEIGHTS_FILE, *leaves)
  return directory


def load(directory: str | Path) -> tuple[Callable, Callable]:
  """(encoder(images), decoder(embeddings, coords, labels, mask_input, has_mask)) from ``save``."""
  directory = Path(directory)
  with np.load(directory / WEIGHTS_FILE) as f:
    leaves = [jnp.asarray(f[f'arr_{i}']) for i in range(len(f.files))]
  encoder = jax.export.deserialize(bytearray((directory / ENCODER_FILE).read_bytes()))
  decoder = jax.export.deserialize(bytearray((directory / DECODER_FILE).read_bytes()))
  return (lambda images: encoder.call(leaves, images),
          lambda *args: decoder.call(leaves, *args))


def main(argv: list[str] | None = None) -> int:
  from sam_jax.build_sam import sam_model_registry
  parser = argparse.ArgumentParser(prog='python -m sam_jax.export', description=__doc__.split('\n')[0])
  parser.add_argument('--model-type', required=True, choices=sorted(sam_model_registry))
  parser.add_argument('--checkpoint', default=None, help='weights (random when omitted)')
  parser.add_argument('--output', required=True)
  args = parser.parse_args(argv)
  model = sam_model_registry[args.model_type](checkpoint=args.checkpoint)
  print(f'wrote {save(model, args.output)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
