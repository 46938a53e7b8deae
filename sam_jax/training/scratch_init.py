"""Optional changes to the initialisation of a model trained from scratch (``config.scratch_init``).

A freshly initialised SAM first predicts the same mask everywhere and stays there for hundreds of
steps: to follow a click, the mask decoder's cross-attention must learn to match a point's Fourier
position encoding with the image's (``W_q^T W_k`` aligned on the encoding), and random image
features added to the image keys bury that signal. Measured on vit_tiny (2-core CPU, 4 images x 8
masks per step), two changes shorten that plateau:

  tie_cross_attention_qk = s  every decoder cross-attention starts with ``k_proj = q_proj = s x``
                              PyTorch's default init, so ``W_q^T W_k`` is positive semi-definite
                              and a point attends to the image cells near it from step 0;
  neck_scale = a              the scale of the image encoder's last LayerNorm starts at ``a``
                              (0: the decoder first learns positions on a blank embedding; the
                              scale, and through it the encoder, gets gradients from step 1).

Both are off in the paper's recipes (the paper starts the encoder from MAE) and only act on a
fresh model: checkpoint loads replace every value they touch.
"""
from __future__ import annotations

from sam_jax.modeling.sam import Sam


def apply(model: Sam, tie_cross_attention_qk: float = 0.0, neck_scale: float = 1.0) -> None:
  """Changes ``model``'s parameters in place (``tie_cross_attention_qk=0``: untouched)."""
  if tie_cross_attention_qk:
    t = model.mask_decoder.transformer
    cross = [a for block in t.layers
             for a in (block.cross_attn_token_to_image, block.cross_attn_image_to_token)]
    for attn in cross + [t.final_attn_token_to_image]:
      attn.q_proj.kernel.value = attn.q_proj.kernel.value * tie_cross_attention_qk
      attn.k_proj.kernel.value = attn.q_proj.kernel.value
  if neck_scale != 1.0:
    norm = model.image_encoder.neck[-1]
    norm.scale.value = norm.scale.value * neck_scale
