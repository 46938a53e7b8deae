"""Model internals: chunked global attention, block grouping, the torch bilinear matrices, the
prompt encoder's traced "no mask prompt" flag."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import sam_jax.modeling.attention as attention
import sam_jax.modeling.image_encoder as image_encoder
from sam_jax.modeling.config import VARIANTS
from sam_jax.modeling.sam import bilinear_matrix


def test_chunked_attention_equals_unchunked(monkeypatch):
  cfg = VARIANTS['vit_tiny']
  block = image_encoder.Block(cfg, window_size=0, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, cfg.grid_size, cfg.grid_size, cfg.encoder_embed_dim))
  nnx.update(block, jax.tree.map(lambda v: v + 0.1, nnx.state(block)))  # non-zero rel_pos tables
  whole = block(x)
  monkeypatch.setattr(attention, 'ATTENTION_CHUNK_ELEMENTS', 1)  # one query row per chunk
  assert attention.query_rows_per_chunk(2, 3, 16, 16) == 1
  np.testing.assert_allclose(np.asarray(block(x)), np.asarray(whole), rtol=1e-4, atol=1e-4)


def test_rows_per_chunk_divides_and_fits():
  assert attention.query_rows_per_chunk(1, 12, 64, 64) == 2  # vit_b global: 2 rows x 64
  assert attention.query_rows_per_chunk(25, 12, 14, 14) == 7  # 25 windows: 2 chunks
  for b, n in ((1, 16), (8, 16), (64, 16)):
    r = attention.query_rows_per_chunk(b, n, 64, 64)
    assert 64 % r == 0


def test_blocks_are_stacked_in_groups():
  enc = nnx.eval_shape(lambda: image_encoder.ImageEncoderViT(VARIANTS['vit_b'], rngs=nnx.Rngs(0)))
  assert enc.window_blocks.attn.qkv.kernel.shape == (4, 2, 768, 2304)
  assert enc.global_blocks.attn.qkv.kernel.shape == (4, 768, 2304)
  assert enc.window_blocks.attn.rel_pos_h.shape == (4, 2, 27, 64)
  assert enc.global_blocks.attn.rel_pos_h.shape == (4, 127, 64)
  assert enc.window_blocks.attn.qkv.kernel.get_metadata()['out_sharding'] == (
      'layers', 'sublayers', 'embed', 'qkv')


def test_mask_given_false_is_no_mask_prompt():
  """PromptEncoder(masks, mask_given=False) embeds as masks=None (the training rounds' scan runs
  round 0 through the mask path with this flag); True, or per prompt, as the mask itself."""
  from sam_jax.modeling.prompt_encoder import PromptEncoder
  cfg = VARIANTS['vit_tiny']
  enc = PromptEncoder(cfg, rngs=nnx.Rngs(0))
  coords = jax.random.uniform(jax.random.key(1), (3, 2, 2)) * cfg.image_size
  labels = jax.numpy.array([[1, -1], [2, 3], [0, 1]])
  masks = jax.random.normal(jax.random.key(2), (3, 4 * cfg.grid_size, 4 * cfg.grid_size, 1))
  sparse, none = enc(coords, labels)
  _, with_mask = enc(coords, labels, masks)
  assert not np.allclose(none, with_mask)
  for given, want in ((False, none), (True, with_mask),
                      (np.array([True, False, True]), np.stack([with_mask[0], none[1],
                                                                with_mask[2]]))):
    s, dense = jax.jit(enc)(coords, labels, masks, np.asarray(given))
    np.testing.assert_array_equal(s, sparse)
    np.testing.assert_allclose(dense, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('n_in, n_out', [(256, 1024), (1024, 683), (64, 256), (683, 400), (5, 3)])
def test_bilinear_matrix_matches_torch(n_in, n_out):
  torch = pytest.importorskip('torch')
  x = np.random.default_rng(0).standard_normal((n_in, 7)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x.T.copy())[None], size=n_out,
                                        mode='linear', align_corners=False)[0].numpy().T
  np.testing.assert_allclose(bilinear_matrix(n_in, n_out) @ x, ref, atol=1e-5)
