"""Random official models whose automatic masks are worth comparing (tests and bench/amg_cpu.py),
and the official generator's NMS with a fixed tie rule."""
from __future__ import annotations


def coherent_masks(sam, logit_scale: float = 1000.0, logit_offset: float = -40.0,
                   iou_shift: float = 0.6):
  """Edits a random official ``Sam`` in place so that its masks are image regions, not noise.

  A fully random decoder gives masks of 2x2-kernel texture spread over the whole image: every box
  is the image, so NMS keeps one mask and the stability score (offset 1.0) is 0. Here the two
  upscaling transposed convolutions repeat one kernel tap (nearest-neighbour upsampling, so a mask
  is a union of token cells), the mask logits are scaled by ``logit_scale`` and shifted by
  ``logit_offset`` (upscaled channel 0 made the constant GELU(3), hypernetwork output 0 its
  weight), and the predicted IoUs moved by ``iou_shift``. The defaults suit vit_tiny (masks of
  hundreds to thousands of pixels, stability scores 0.3 to 1 at offset 1.0, predicted IoUs 0.45 to
  0.65); logits scale differently with other decoders. Returns ``sam``.
  """
  import torch
  decoder = sam.mask_decoder
  with torch.no_grad():
    for k in (0, 3):  # ConvTranspose2d weights (in, out, 2, 2): every tap = tap (0, 0)
      w = decoder.output_upscaling[k].weight
      w.copy_(w[:, :, :1, :1].expand_as(w).clone())
    last_up = decoder.output_upscaling[3]
    last_up.weight[:, 0] = 0.0
    last_up.bias[0] = 3.0
    const = float(torch.nn.functional.gelu(torch.tensor(3.0)))
    for mlp in decoder.output_hypernetworks_mlps:
      out = mlp.layers[-1]
      out.weight.mul_(logit_scale)
      out.bias.mul_(logit_scale)
      out.weight[0] = 0.0
      out.bias[0] = logit_offset / const
    decoder.iou_prediction_head.layers[-1].bias.add_(iou_shift)
  return sam


def stable_batched_nms(boxes, scores, idxs, iou_threshold):
  """torchvision's ``batched_nms`` (one category, as the generator calls it) with ties in score
  broken by index."""
  import numpy as np
  import torch
  del idxs
  order = torch.as_tensor(np.argsort(-scores.numpy(), kind='stable'))
  b = boxes[order]
  area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  inter = (torch.minimum(b[:, None, 2:], b[None, :, 2:]) -
           torch.maximum(b[:, None, :2], b[None, :, :2])).clamp(min=0).prod(-1)
  iou = inter / (area[:, None] + area[None, :] - inter)
  keep = torch.ones(len(b), dtype=torch.bool)
  for i in range(len(b)):
    if keep[i]:
      keep[i + 1:] &= ~(iou[i, i + 1:] > iou_threshold)
  return order[keep]
