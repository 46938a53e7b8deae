"""The encoder's attention forms (modeling.attention) against the chunked CPU path: outputs and
gradients, windowed (padded) and global blocks, odd non-square grids; form selection per backend;
the precision setting reaching every matmul."""
from __future__ import annotations

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sam_jax.modeling import attention, transformer
from sam_jax.modeling.config import VARIANTS, SamConfig, variant_name
from sam_jax.modeling.image_encoder import Block, ImageEncoderViT
from sam_jax.modeling.sam import Sam

FORMS = {'folded': attention.folded, 'bias': attention.bias}


def random_inputs(b, h, w, n, d, dtype=jnp.float32, seed=0):
  """q, k, v (B, HW, heads, d) and gathered tables Rh (H, H, d), Rw (W, W, d)."""
  rng = np.random.default_rng(seed)
  qkv = [jnp.asarray(rng.standard_normal((b, h * w, n, d)), dtype) for _ in range(3)]
  tables = [jnp.asarray(0.5 * rng.standard_normal((s, s, d)), dtype) for s in (h, w)]
  return (*qkv, *tables)


@jax.jit(static_argnums=0)
def outputs_and_grads(fn, args, cotangent):
  out, vjp = jax.vjp(fn, *args)
  return out, vjp(cotangent)


def chunked_with_args(*args, grid, scale):
  return attention.chunked(*args, grid, scale)  # the chunk plan is read when traced


@pytest.mark.parametrize('form', sorted(FORMS))
@pytest.mark.parametrize('b, h, w, n, d, chunk', [
    (2, 5, 7, 3, 8, None),     # odd, non-square grid, batch > 1
    (3, 7, 7, 2, 16, None),    # a window of 7 (vit_tiny)
    (2, 6, 4, 2, 8, 2 * 2 * 4 * 24 * 2),  # the chunked path in 3 chunks of 2 query rows
])
def test_forms_match_chunked(form, b, h, w, n, d, chunk, monkeypatch):
  if chunk:
    monkeypatch.setattr(attention, 'ATTENTION_CHUNK_ELEMENTS', chunk)
    assert attention.query_rows_per_chunk(b, n, h, w) == 2
  args = random_inputs(b, h, w, n, d)
  scale = d**-0.5
  ref_fn = functools.partial(chunked_with_args, grid=(h, w), scale=scale)
  fn = functools.partial(FORMS[form], grid=(h, w), scale=scale, implementation='xla')
  cot = jnp.asarray(np.random.default_rng(1).standard_normal((b, h * w, n, d)), jnp.float32)
  ref, ref_grads = outputs_and_grads(ref_fn, args, cot)
  out, grads = outputs_and_grads(fn, args, cot)
  assert out.shape == (b, h * w, n, d)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-6)
  for name, g, rg in zip(('q', 'k', 'v', 'rel_h', 'rel_w'), grads, ref_grads):
    np.testing.assert_allclose(g, rg, rtol=1e-5, atol=1e-5 * float(jnp.abs(rg).max()),
                               err_msg=name)


@pytest.mark.parametrize('form', sorted(FORMS))
def test_forms_match_chunked_in_bfloat16(form):
  b, h, w, n, d = 2, 5, 7, 2, 16
  args = random_inputs(b, h, w, n, d, jnp.bfloat16)
  ref = attention.chunked(*args, (h, w), d**-0.5).astype(jnp.float32)
  out = FORMS[form](*args, (h, w), d**-0.5, implementation='xla').astype(jnp.float32)
  assert out.dtype == ref.dtype
  np.testing.assert_allclose(out, ref, atol=0.05)  # bf16 rounding of the logits and of v


def test_folded_head_dim():
  assert attention.folded_head_dim(80, (64, 64)) == 208  # vit_h global
  assert attention.folded_head_dim(80, (14, 14)) == 112  # vit_h windows: 108 padded
  assert attention.folded_head_dim(8, (5, 7)) == 24


def with_random_rel_pos(module, scale=0.3):
  """``module`` with random relative-position tables and position embedding (zeros at init)."""
  state = nnx.state(module)
  flat = nnx.to_flat_state(state)
  for i, (path, var) in enumerate(flat):
    if str(path[-1]).startswith('rel_pos') or str(path[-1]) == 'pos_embed':
      value = var.get_value()
      var.set_value(scale * jax.random.normal(jax.random.key(i), value.shape, value.dtype))
  nnx.update(module, nnx.from_flat_state(flat))
  return module


@pytest.mark.parametrize('form', ['folded', 'bias'])  # XLA's implementation on CPU
@pytest.mark.parametrize('window_size', [7, 0])  # 7: 16x16 tokens padded to 21x21; 0: global
def test_blocks_match_chunked(form, window_size):
  cfg = VARIANTS['vit_tiny'].replace(encoder_embed_dim=32, encoder_num_heads=2,
                                     attention='chunked')
  graphdef, state = nnx.split(with_random_rel_pos(Block(cfg, window_size=window_size,
                                                        rngs=nnx.Rngs(0))))
  form_def, _ = nnx.split(nnx.eval_shape(lambda: Block(cfg.replace(attention=form),
                                                       window_size=window_size, rngs=nnx.Rngs(0))))
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, cfg.encoder_embed_dim))

  def loss(graphdef, state, x):
    y = nnx.merge(graphdef, state)(x)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y

  grad = jax.jit(jax.grad(loss, argnums=(1, 2), has_aux=True), static_argnums=0)
  (ref_gs, ref_gx), ref = grad(graphdef, state, x)
  (gs, gx), out = grad(form_def, state, x)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, ref_gx, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref_gx).max()))
  for (path, g), (_, rg) in zip(nnx.to_flat_state(gs), nnx.to_flat_state(ref_gs)):
    g, rg = g.get_value(), rg.get_value()
    np.testing.assert_allclose(g, rg, rtol=1e-5, atol=1e-5 * float(jnp.abs(rg).max()),
                               err_msg='/'.join(map(str, path)))


def test_whole_encoder_folded_equals_chunked():
  cfg = VARIANTS['vit_tiny']
  graphdef, state = nnx.split(with_random_rel_pos(ImageEncoderViT(cfg, rngs=nnx.Rngs(0))))
  folded_def, _ = nnx.split(nnx.eval_shape(
      lambda: ImageEncoderViT(cfg.replace(attention='folded'), rngs=nnx.Rngs(0))))
  x = jax.random.normal(jax.random.key(2), (2, cfg.image_size, cfg.image_size, 3))
  run = jax.jit(lambda g, s, x: nnx.merge(g, s)(x), static_argnums=0)
  ref, out = run(graphdef, state, x), run(folded_def, state, x)
  assert cfg.attention == 'auto' and attention.choose(
      'auto', dtype=jnp.float32, d=32, grid=(16, 16)) == ('chunked', None)  # CPU default
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-5)


def test_folded_exports_with_a_symbolic_batch():
  h, w, n, d = 5, 7, 2, 8
  b, = jax.export.symbolic_shape('b')
  spec = [jax.ShapeDtypeStruct((b, h * w, n, d), jnp.float32)] * 3 + [
      jax.ShapeDtypeStruct((h, h, d), jnp.float32), jax.ShapeDtypeStruct((w, w, d), jnp.float32)]
  fn = jax.jit(lambda *a: attention.attend('folded', *a, (h, w), d**-0.5))
  exported = jax.export.export(fn)(*spec)
  args = random_inputs(3, h, w, n, d)
  np.testing.assert_allclose(exported.call(*args), attention.chunked(*args, (h, w), d**-0.5),
                             rtol=1e-5, atol=2e-6)


# --- choosing a form -----------------------------------------------------------------------------


def test_choose_per_backend(monkeypatch):
  bf16, f32 = jnp.bfloat16, jnp.float32
  vit_h_global = dict(d=80, grid=(64, 64))
  choose = attention.choose
  assert choose('auto', dtype=bf16, platform='cpu', **vit_h_global) == ('chunked', None)
  assert choose('auto', dtype=bf16, platform='tpu', **vit_h_global) == ('chunked', None)
  assert choose('folded', dtype=bf16, platform='cpu', **vit_h_global) == ('folded', 'xla')
  assert choose('bias_xla', dtype=bf16, platform='gpu', **vit_h_global) == ('bias', 'xla')
  monkeypatch.setattr(attention, 'cuda_capability', lambda: (9, 0))  # an H100
  assert choose('auto', dtype=bf16, platform='gpu', **vit_h_global) == ('folded', 'cudnn')
  assert choose('auto', dtype=f32, platform='gpu', **vit_h_global) == ('chunked', None)
  assert choose('bias', dtype=bf16, platform='gpu', **vit_h_global) == ('bias', 'cudnn')
  with pytest.warns(UserWarning, match='even token count'):
    assert choose('bias', dtype=bf16, platform='gpu', d=32, grid=(7, 7)) == ('bias', 'xla')
  with pytest.warns(UserWarning, match='bf16 / f16'):
    assert choose('folded', dtype=f32, platform='gpu', **vit_h_global) == ('folded', 'xla')
  monkeypatch.setattr(attention, 'cuda_capability', lambda: (8, 0))  # an A100: head dim <= 128
  assert choose('auto', dtype=bf16, platform='gpu', **vit_h_global) == ('bias', 'cudnn')
  assert choose('auto', dtype=bf16, platform='gpu', d=80, grid=(14, 14)) == ('folded', 'cudnn')
  monkeypatch.setattr(attention, 'cuda_capability', lambda: None)  # a ROCm GPU
  assert choose('auto', dtype=bf16, platform='gpu', **vit_h_global) == ('chunked', None)


def test_unknown_names_raise():
  with pytest.raises(ValueError, match="unknown attention 'flash'.*chunked"):
    VARIANTS['vit_tiny'].replace(attention='flash')
  with pytest.raises(ValueError, match='unknown attention'):
    attention.attend('flash', *random_inputs(1, 2, 2, 1, 8), (2, 2), 1.0)
  with pytest.raises(ValueError, match="unknown precision 'fp64'"):
    VARIANTS['vit_tiny'].replace(precision='fp64')


def test_runtime_fields_leave_the_variant_and_old_config_files_load():
  cfg = VARIANTS['vit_b'].replace(attention='folded', precision='highest', dtype='bfloat16')
  assert variant_name(cfg) == 'vit_b'
  assert SamConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  old = VARIANTS['vit_tiny'].to_dict()
  del old['attention'], old['precision']  # a sam_config.json written before these fields
  assert SamConfig.from_dict(old) == VARIANTS['vit_tiny']


# --- precision -----------------------------------------------------------------------------------


def matmul_precisions(hlo: str) -> list[str]:
  """The precision of every dot_general and convolution in StableHLO text."""
  ops = [l for l in hlo.splitlines()
         if 'stablehlo.dot_general' in l or 'stablehlo.convolution' in l]
  return [m.group(1) if (m := re.search(r'precision[ _a-z]*= \[(?:#stablehlo<precision )?([A-Z]+)',
                                        l)) else 'NONE' for l in ops]


@pytest.mark.parametrize('form', ['chunked', 'folded', 'bias'])
def test_highest_precision_reaches_every_matmul(form):
  cfg = VARIANTS['vit_tiny'].replace(attention=form, precision='highest')
  state = nnx.state(nnx.eval_shape(lambda: Sam(cfg, rngs=nnx.Rngs(0))))
  g, s = cfg.grid_size, cfg.image_size
  image = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
  emb = jax.ShapeDtypeStruct((1, g, g, cfg.prompt_embed_dim), jnp.float32)
  coords = jax.ShapeDtypeStruct((2, 3, 2), jnp.float32)
  labels = jax.ShapeDtypeStruct((2, 3), jnp.int32)
  masks = jax.ShapeDtypeStruct((2, 4 * g, 4 * g), jnp.float32)

  def lowered(cfg):
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Sam(cfg, rngs=nnx.Rngs(0))))

    def encode_and_decode(state, image, emb, coords, labels, masks):
      model = nnx.merge(graphdef, state)
      return model.embed_images(image), model.decode(emb, coords, labels, masks,
                                                     multimask_output=True)

    return jax.jit(encode_and_decode).lower(state, image, emb, coords, labels, masks).as_text()

  found = matmul_precisions(lowered(cfg))
  assert len(found) > 10 and set(found) == {'HIGHEST'}, found
  assert 'HIGHEST' not in matmul_precisions(lowered(cfg.replace(precision='default')))


@pytest.mark.parametrize('nq, nk, dtype', [
    (37, 3, jnp.float32),   # image -> tokens: few keys (one masked)
    (3, 37, jnp.float32),   # tokens -> image: few queries
    (3, 37, jnp.bfloat16),
    (37, 3, jnp.bfloat16),
])
def test_decoder_attention_folds_to_the_projected_form(nq, nk, dtype, monkeypatch):
  """The mask decoder's cross-attention folds the long side's projections into the short side's
  when heads x the short side is under the projected width: outputs and gradients (inputs and
  parameters) equal the official projected form's, and the fold is what the layer runs here."""
  attn = transformer.Attention(32, 2, downsample_rate=2, dtype=dtype, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.standard_normal((2, n, 32)), jnp.float32) for n in (nq, nk))
  v = jnp.asarray(rng.standard_normal((2, nk, 32)), jnp.float32)
  key_mask = jnp.ones((2, nk), bool).at[1, -1].set(False)
  cot = jnp.asarray(rng.standard_normal((2, nq, 32)), jnp.float32)
  graphdef, params = nnx.split(attn)
  with monkeypatch.context() as patch:  # fails if __call__ does not fold
    patch.setattr(transformer.Attention, '_projected', None)
    assert attn(q, k, v, key_mask).shape == (2, nq, 32)

  def run(method):
    def fn(params, q, k, v):
      return getattr(nnx.merge(graphdef, params), method)(q, k, v, key_mask).astype(jnp.float32)
    out, vjp = jax.vjp(fn, params, q, k, v)
    return out, jax.tree.leaves(vjp(cot))

  ref, ref_grads = run('_projected')
  out, grads = run('_few_keys' if nk < nq else '_few_queries')
  tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out, ref, **tol)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g.astype(jnp.float32), r.astype(jnp.float32),
                               **{key: 5 * t for key, t in tol.items()})
