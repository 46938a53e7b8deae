"""jax.export artifacts: reloaded in a process without our model code, same outputs as the model."""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from sam_jax import sam_model_registry
from sam_jax import export as sam_export
from sam_jax.predictor import assemble_prompts

RELOAD = r'''
import sys, numpy as np, jax, jax.numpy as jnp
from pathlib import Path
d = Path(sys.argv[1])
with np.load(d / "weights.npz") as f:
  leaves = [jnp.asarray(f[f"arr_{i}"]) for i in range(len(f.files))]
enc = jax.export.deserialize(bytearray((d / "image_encoder.jax").read_bytes()))
dec = jax.export.deserialize(bytearray((d / "prompt_decoder.jax").read_bytes()))
inp = np.load(d / "inputs.npz")
emb = enc.call(leaves, inp["images"])
low, iou = dec.call(leaves, emb[:1], inp["coords"], inp["labels"], inp["masks"], inp["has_mask"])
assert "sam_jax.modeling" not in sys.modules
np.savez(d / "outputs.npz", emb=np.asarray(emb), low=np.asarray(low), iou=np.asarray(iou))
'''


def test_exported_programs_reload_and_match(tmp_path):
  sam = sam_model_registry['vit_tiny'](seed=2)
  cfg = sam.config
  sam_export.save(sam, tmp_path)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  coords, labels = assemble_prompts(rng.uniform(0, 256, (3, 2, 2)), np.array([[1, 0]] * 3),
                                    rng.uniform(0, 256, (3, 4)), 3)  # 2 points + box, 3 sets
  masks = rng.standard_normal((3, cfg.low_res_size, cfg.low_res_size)).astype(np.float32)
  has_mask = np.array([True, False, True])
  np.savez(tmp_path / 'inputs.npz', images=images, coords=coords, labels=labels, masks=masks,
           has_mask=has_mask)
  subprocess.run([sys.executable, '-c', RELOAD, str(tmp_path)], check=True)
  out = np.load(tmp_path / 'outputs.npz')

  emb = np.asarray(sam.embed_images(images))
  np.testing.assert_allclose(out['emb'], emb, atol=1e-5)
  for i in range(3):
    mask_in = masks[i:i + 1] if has_mask[i] else None
    for multimask, tokens in ((True, slice(1, 4)), (False, slice(0, 1))):
      low, iou = sam.decode(emb[:1], coords[i:i + 1], labels[i:i + 1], mask_in,
                            multimask_output=multimask)
      np.testing.assert_allclose(out['low'][i:i + 1, tokens], np.asarray(low), atol=1e-5)
      np.testing.assert_allclose(out['iou'][i:i + 1, tokens], np.asarray(iou), atol=1e-6)

  # The same artifacts serve other prompt counts and batch sizes (symbolic shapes), in-process too.
  encoder, decoder = sam_export.load(tmp_path)
  assert encoder(images[:1]).shape == (1, cfg.grid_size, cfg.grid_size, cfg.prompt_embed_dim)
  c5, l5 = assemble_prompts(rng.uniform(0, 256, (5, 7, 2)), np.ones((5, 7)), None, 5)
  low, iou = decoder(emb[:1], c5, l5, np.zeros((5, 64, 64), np.float32), np.zeros(5, bool))
  assert low.shape == (5, 4, 64, 64) and iou.shape == (5, 4)
