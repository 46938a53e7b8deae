"""Segment Anything in JAX + Flax NNX."""
from sam_jax.build_sam import (build_sam, build_sam_vit_b, build_sam_vit_h, build_sam_vit_l,
                               sam_model_registry)
from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
from sam_jax.modeling.config import SamConfig, VARIANTS
from sam_jax.modeling.sam import Sam
from sam_jax.predictor import SamPredictor

__all__ = ['Sam', 'SamAutomaticMaskGenerator', 'SamConfig', 'SamPredictor', 'VARIANTS', 'build_sam',
           'build_sam_vit_b', 'build_sam_vit_h', 'build_sam_vit_l', 'sam_model_registry']
