"""SAM's mask decoder (official ``segment_anything.modeling.mask_decoder``), NHWC."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sam_jax.modeling.config import SamConfig
from sam_jax.modeling.layers import (Activation, ConvTranspose2x2, Embedding, LayerNorm, Linear,
                                     with_precision)
from sam_jax.modeling.transformer import TwoWayTransformer


class MLP(nnx.Module):
  """num_layers Linear layers with ReLU between them (official ``mask_decoder.MLP``)."""

  def __init__(self, din: int, hidden: int, dout: int, num_layers: int, *, dtype, rngs):
    dims = [din] + [hidden] * (num_layers - 1) + [dout]
    self.layers = nnx.List([
        Linear(a, b, axes=(None, None), dtype=dtype, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])
    ])

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return x


class MaskDecoder(nnx.Module):
  """Prompt tokens + image embedding -> mask logits and IoU predictions (official ``MaskDecoder``)."""

  def __init__(self, cfg: SamConfig, *, rngs: nnx.Rngs):
    dim, dtype = cfg.prompt_embed_dim, cfg.compute_dtype
    self.num_mask_tokens = cfg.num_multimask_outputs + 1
    self.transformer = TwoWayTransformer(cfg.decoder_depth, dim, cfg.decoder_num_heads,
                                         cfg.decoder_mlp_dim, dtype=dtype, rngs=rngs)
    self.iou_token = Embedding(1, dim, rngs=rngs)
    self.mask_tokens = Embedding(self.num_mask_tokens, dim, rngs=rngs)
    self.output_upscaling = nnx.List([
        ConvTranspose2x2(dim, dim // 4, dtype=dtype, rngs=rngs),
        LayerNorm(dim // 4, eps=1e-6, axis_name=None, dtype=dtype),
        Activation('gelu'),
        ConvTranspose2x2(dim // 4, dim // 8, dtype=dtype, rngs=rngs),
        Activation('gelu'),
    ])
    self.output_hypernetworks_mlps = nnx.List([
        MLP(dim, dim, dim // 8, 3, dtype=dtype, rngs=rngs) for _ in range(self.num_mask_tokens)
    ])
    self.iou_prediction_head = MLP(dim, cfg.iou_head_hidden_dim, self.num_mask_tokens,
                                   cfg.iou_head_depth, dtype=dtype, rngs=rngs)
    self.precision = cfg.matmul_precision

  @with_precision
  def __call__(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
               multimask_output: bool | str, token_mask=None, drop=None
               ) -> tuple[jax.Array, jax.Array]:
    """Mask logits (B, C, 4g, 4g) and IoU predictions (B, C): C = 3 (mask tokens 1..3) for
    multimask output, else 1 (token 0), as the official decoder; ``multimask_output='all'`` gives
    all four (training picks per mask).

    image_embeddings (1 or B, g, g, C), image_pe (1, g, g, C), sparse (B, N, C), dense (B, g, g, C),
    token_mask (B, N) bool or None (False: a padding slot, left out of attention); drop: (key,
    rate) for the transformer's dropout in training.
    """
    b = sparse_prompt_embeddings.shape[0]
    output_tokens = jnp.concatenate([self.iou_token.weight[...], self.mask_tokens.weight[...]])
    output_tokens = jnp.broadcast_to(output_tokens, (b,) + output_tokens.shape)
    tokens = jnp.concatenate([output_tokens, sparse_prompt_embeddings.astype(jnp.float32)], axis=1)
    if token_mask is not None:
      token_mask = jnp.concatenate([jnp.ones((b, output_tokens.shape[1]), bool), token_mask], 1)
    src = image_embeddings + dense_prompt_embeddings  # (B, g, g, C)
    g = src.shape[1]
    hs, src = self.transformer(src, image_pe, tokens, token_mask, drop)
    iou_token_out = hs[:, 0]
    mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens]
    # output_upscaling (ConvT, LN, GELU, ConvT, GELU), kept in 2x2-block layout until the masks:
    # pixel (4h + 2p + r, 4w + 2q + s) is block (h, w, p, q, r, s); interleaving the few mask
    # channels at the end is cheaper than interleaving the 64- and 32-channel features.
    conv1, norm, act1, conv2, act2 = self.output_upscaling
    upscaled = act2(conv2(act1(norm(conv1(src.reshape(b, g, g, -1))))))  # (B, g, g, 2, 2, 2, 2, C/8)
    if multimask_output == 'all':
      chosen = range(self.num_mask_tokens)
    else:
      chosen = range(1, self.num_mask_tokens) if multimask_output else range(1)
    hyper_in = jnp.stack(
        [self.output_hypernetworks_mlps[i](mask_tokens_out[:, i]) for i in chosen],
        axis=1)  # (B, M, dim/8)
    masks = jnp.einsum('bmc,bhwpqrsc->bmhprwqs', hyper_in, upscaled.astype(hyper_in.dtype))
    masks = masks.reshape(b, len(chosen), 4 * g, 4 * g)  # (B, M, 4g, 4g)
    iou_pred = self.iou_prediction_head(iou_token_out)[:, chosen.start:chosen.stop]
    return masks.astype(jnp.float32), iou_pred.astype(jnp.float32)
