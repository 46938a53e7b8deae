"""SAM model configurations: the official variants and small ones for tests and CPU training."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from sam_jax.modeling.attention import IMPLEMENTATIONS

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
PRECISIONS = ('default', 'high', 'highest')
# SamConfig fields that change how the model computes, not its parameters.
RUNTIME_FIELDS = ('dtype', 'attention', 'precision')


@dataclasses.dataclass(frozen=True)
class SamConfig:
  """Everything that fixes the shapes of a SAM model (official ``build_sam`` arguments)."""
  encoder_embed_dim: int
  encoder_depth: int
  encoder_num_heads: int
  encoder_global_attn_indexes: tuple[int, ...]
  image_size: int = 1024
  patch_size: int = 16
  window_size: int = 14
  mlp_ratio: float = 4.0
  prompt_embed_dim: int = 256
  mask_in_chans: int = 16
  decoder_depth: int = 2
  decoder_num_heads: int = 8
  decoder_mlp_dim: int = 2048
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  dtype: str = 'float32'  # compute dtype; parameters are always float32
  # How the encoder computes attention: a name of ``modeling.attention.IMPLEMENTATIONS``; 'auto'
  # picks per backend when traced (chunked on CPU, fused folded attention through cuDNN on GPUs).
  attention: str = 'auto'
  # Matmul / convolution precision: 'default' leaves it to jax (jax_default_matmul_precision:
  # float32 matmuls run as TF32 on recent NVIDIA GPUs, as the official model's cuDNN convolutions
  # do, and as one bf16 pass on TPUs); 'highest' gives full float32 everywhere, for parity work ('high':
  # bf16_3x / TF32x3 where the platform has it). Encoder: passed to every matmul, einsum and conv;
  # prompt encoder + decoder: traced under jax.default_matmul_precision (see layers.with_precision).
  precision: str = 'default'

  def __post_init__(self):
    if self.attention not in IMPLEMENTATIONS:
      raise ValueError(f'unknown attention {self.attention!r}; choose one of {IMPLEMENTATIONS}')
    if self.precision not in PRECISIONS:
      raise ValueError(f'unknown precision {self.precision!r}; choose one of {PRECISIONS}')

  @property
  def grid_size(self) -> int:
    """Side of the image embedding in tokens (64 for 1024 / 16)."""
    return self.image_size // self.patch_size

  @property
  def low_res_size(self) -> int:
    """Side of the decoder's low-resolution mask logits (and of a mask prompt): 4 x grid."""
    return 4 * self.grid_size

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def matmul_precision(self) -> str | None:
    """``precision=`` of jax's matmuls and convolutions: None (jax's default), 'high', 'highest'."""
    return None if self.precision == 'default' else self.precision

  def architecture(self) -> 'SamConfig':
    """This configuration with the settings that leave the parameters alone (dtype, attention,
    precision) at their defaults: configurations with equal architectures share checkpoints."""
    return self.replace(**{f: SamConfig.__dataclass_fields__[f].default for f in RUNTIME_FIELDS})

  @property
  def block_groups(self) -> tuple[int, int]:
    """(groups, blocks per group): each group is windowed blocks followed by one global block."""
    idx = tuple(self.encoder_global_attn_indexes)
    n = len(idx)
    per = self.encoder_depth // max(n, 1)
    if n == 0 or per * n != self.encoder_depth or idx != tuple(per * (g + 1) - 1 for g in range(n)):
      raise ValueError(
          f'global_attn_indexes {idx} must be evenly spaced and end every group of the '
          f'{self.encoder_depth} blocks (as in all official variants), e.g. (2, 5, 8, 11)')
    return n, per

  def replace(self, **kw: Any) -> 'SamConfig':
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['encoder_global_attn_indexes'] = list(self.encoder_global_attn_indexes)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'SamConfig':
    """The inverse of ``to_dict``; fields missing from older files take their defaults."""
    d = dict(d)
    d['encoder_global_attn_indexes'] = tuple(d['encoder_global_attn_indexes'])
    return cls(**d)


VARIANTS: dict[str, SamConfig] = {
    'vit_h': SamConfig(1280, 32, 16, (7, 15, 23, 31)),
    'vit_l': SamConfig(1024, 24, 16, (5, 11, 17, 23)),
    'vit_b': SamConfig(768, 12, 12, (2, 5, 8, 11)),
    # Small, for tests, the CPU demo and CPU training: 256 px input, 16x16 tokens, window 7 (so the
    # windowed blocks pad 16 -> 21 like the official 64 -> 70), a narrower decoder with the
    # official head width (2 heads of 32 / 16 dims in self- / cross-attention, as 8 of 256 / 128):
    # 8 heads of 4 dims left the click's position lookup too blunt to learn quickly (README).
    'vit_tiny': SamConfig(96, 4, 3, (1, 3), image_size=256, window_size=7, prompt_embed_dim=64,
                          decoder_num_heads=2, decoder_mlp_dim=256, iou_head_hidden_dim=64),
}
VARIANTS['default'] = VARIANTS['vit_h']


def variant_name(cfg: SamConfig) -> str | None:
  """The registry name of a configuration (ignoring dtype, attention and precision), or None."""
  for name, v in VARIANTS.items():
    if name != 'default' and v.architecture() == cfg.architecture():
      return name
  return None
