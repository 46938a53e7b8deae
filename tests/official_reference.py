"""The official PyTorch SAM (segment-anything 1.0) built to any of our configurations, every tensor
random, for parity tests; and the single point evaluation protocol written out around the official
``SamPredictor`` (one mask, one ``predict`` call per click, distance transforms on the whole image),
independent of ``sam_jax.evaluation``."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from sam_jax.modeling.config import PIXEL_MEAN, PIXEL_STD, SamConfig


def official_sam(cfg: SamConfig, seed: int = 0):
  """An official ``Sam`` with our ``cfg``'s shapes and every tensor randomised."""
  from functools import partial

  import torch
  from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                         TwoWayTransformer)
  torch.manual_seed(seed)
  g = cfg.grid_size
  sam = Sam(
      image_encoder=ImageEncoderViT(
          depth=cfg.encoder_depth, embed_dim=cfg.encoder_embed_dim, img_size=cfg.image_size,
          mlp_ratio=cfg.mlp_ratio, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
          num_heads=cfg.encoder_num_heads, patch_size=cfg.patch_size, qkv_bias=True,
          use_rel_pos=True, global_attn_indexes=cfg.encoder_global_attn_indexes,
          window_size=cfg.window_size, out_chans=cfg.prompt_embed_dim),
      prompt_encoder=PromptEncoder(
          embed_dim=cfg.prompt_embed_dim, image_embedding_size=(g, g),
          input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=cfg.mask_in_chans),
      mask_decoder=MaskDecoder(
          num_multimask_outputs=cfg.num_multimask_outputs,
          transformer=TwoWayTransformer(depth=cfg.decoder_depth,
                                        embedding_dim=cfg.prompt_embed_dim,
                                        mlp_dim=cfg.decoder_mlp_dim,
                                        num_heads=cfg.decoder_num_heads),
          transformer_dim=cfg.prompt_embed_dim, iou_head_depth=cfg.iou_head_depth,
          iou_head_hidden_dim=cfg.iou_head_hidden_dim),
      pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD))
  sam.eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, t in sam.state_dict().items():
      noise = torch.randn(t.shape, generator=gen)
      if 'norm' in name or 'upscaling.1' in name or 'downscaling.1' in name or \
          'downscaling.4' in name or 'neck.1' in name or 'neck.3' in name:
        t.copy_((1.0 if name.endswith('weight') else 0.0) + 0.1 * noise)  # LayerNorms
      elif 'rel_pos' in name or 'pos_embed' in name:
        t.copy_(0.2 * noise)  # zero in a fresh official model: randomise, or parity proves nothing
      elif name.endswith('bias'):
        t.copy_(0.02 * noise)
  return sam


def save_pth(sam, path) -> str:
  import torch
  torch.save(sam.state_dict(), path)
  return str(path)


def to_numpy(t) -> np.ndarray:
  return t.detach().cpu().numpy()


# The single point protocol around the official predictor.

def ref_farthest(region: np.ndarray):
  """(distance, (y, x)) of the pixel farthest from the region's boundary (border included)."""
  dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
  y, x = np.unravel_index(np.argmax(dist), dist.shape)
  return dist[y, x], (x, y)


def ref_iou(a: np.ndarray, b: np.ndarray) -> float:
  return float((a & b).sum() / max((a | b).sum(), 1))


def ref_protocol(predictor, image: np.ndarray, gts: list[np.ndarray], num_points: int):
  """Per mask: (clicks [[x, y, label], ...], IoU after 1 .. num_points clicks, oracle IoU)."""
  import torch
  with torch.no_grad():
    predictor.set_image(image)
  out = []
  for gt in gts:
    _, first = ref_farthest(gt)
    clicks = [[int(first[0]), int(first[1]), 1]]
    with torch.no_grad():
      masks, scores, logits = predictor.predict(
          point_coords=np.array([c[:2] for c in clicks], np.float64),
          point_labels=np.array([c[2] for c in clicks]), multimask_output=True)
    ious3 = [ref_iou(m, gt) for m in masks]
    best = int(np.argmax(scores))
    pred, feedback, ious = masks[best], logits[best][None], [ious3[best]]
    for _ in range(num_points - 1):
      fn_d, fn_xy = ref_farthest(gt & ~pred)
      fp_d, fp_xy = ref_farthest(pred & ~gt)
      if fn_d == 0 and fp_d == 0:  # exact: done, keeps its IoU
        ious.append(ious[-1])
        continue
      x, y = fn_xy if fn_d > fp_d else fp_xy
      clicks.append([int(x), int(y), int(fn_d > fp_d)])
      with torch.no_grad():
        masks, _, logits = predictor.predict(
            point_coords=np.array([c[:2] for c in clicks], np.float64),
            point_labels=np.array([c[2] for c in clicks]), mask_input=feedback,
            multimask_output=False)
      pred, feedback = masks[0], logits[0][None]
      ious.append(ref_iou(pred, gt))
    out.append((clicks, ious, max(ious3)))
  return out
