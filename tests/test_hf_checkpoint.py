"""Hugging Face SamModel checkpoints -> official state dicts (sam_jax.checkpoints.hf).

A small random transformers SamModel is saved with save_pretrained, read back with numpy only,
renamed, loaded strictly into the official segment_anything model of the same size, and both models
must give the same image embeddings, masks and IoU predictions.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sam_jax.checkpoints import hf

IMAGE_SIZE, PATCH = 256, 16
EMBED = IMAGE_SIZE // PATCH  # 16x16 image embedding, 64x64 low-res masks
VIT_DIM, VIT_DEPTH, VIT_HEADS, WINDOW, GLOBAL = 64, 3, 2, 7, (1,)  # window 7 pads 16 -> 21
PROMPT_DIM, MASK_IN_CHANS = 32, 16
# IoU head depth 4: HF proj_in, layers.0, layers.1, proj_out -> official layers.0..3.
DEC_MLP, DEC_DEPTH, DEC_HEADS, IOU_DEPTH, IOU_HIDDEN = 64, 2, 2, 4, 24
REL_TOL = 1e-4


def _hf_config():
  from transformers import SamConfig
  return SamConfig(
      vision_config=dict(hidden_size=VIT_DIM, output_channels=PROMPT_DIM,
                         num_hidden_layers=VIT_DEPTH, num_attention_heads=VIT_HEADS,
                         image_size=IMAGE_SIZE, patch_size=PATCH,
                         window_size=WINDOW, global_attn_indexes=list(GLOBAL),
                         num_pos_feats=PROMPT_DIM // 2, mlp_ratio=4.0),
      prompt_encoder_config=dict(hidden_size=PROMPT_DIM, image_size=IMAGE_SIZE, patch_size=PATCH,
                                 mask_input_channels=MASK_IN_CHANS),
      # HF's two-way blocks use this eps for layer_norm1..4 (default 1e-6); the official norm1..4
      # are nn.LayerNorm with eps 1e-5. Not a weight: set the official value so outputs can match
      # (with HF's default the masks here differ by ~5e-5..9e-5 of their scale).
      mask_decoder_config=dict(hidden_size=PROMPT_DIM, mlp_dim=DEC_MLP, num_hidden_layers=DEC_DEPTH,
                               num_attention_heads=DEC_HEADS, num_multimask_outputs=3,
                               iou_head_depth=IOU_DEPTH, iou_head_hidden_dim=IOU_HIDDEN,
                               layer_norm_eps=1e-5),
  )


def _official_model():
  from functools import partial

  import torch
  from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                         TwoWayTransformer)
  encoder = ImageEncoderViT(
      img_size=IMAGE_SIZE, patch_size=PATCH, embed_dim=VIT_DIM, depth=VIT_DEPTH,
      num_heads=VIT_HEADS, mlp_ratio=4.0, out_chans=PROMPT_DIM, qkv_bias=True,
      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=WINDOW,
      global_attn_indexes=GLOBAL)
  prompt = PromptEncoder(embed_dim=PROMPT_DIM, image_embedding_size=(EMBED, EMBED),
                         input_image_size=(IMAGE_SIZE, IMAGE_SIZE), mask_in_chans=MASK_IN_CHANS)
  decoder = MaskDecoder(
      num_multimask_outputs=3, transformer_dim=PROMPT_DIM, iou_head_depth=IOU_DEPTH,
      iou_head_hidden_dim=IOU_HIDDEN,
      transformer=TwoWayTransformer(depth=DEC_DEPTH, embedding_dim=PROMPT_DIM, mlp_dim=DEC_MLP,
                                    num_heads=DEC_HEADS))
  return Sam(encoder, prompt, decoder, pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3).eval()


def _randomise(model) -> None:
  """Every parameter and buffer random (rel_pos, pos_embed are zero at init); LayerNorms near 1."""
  import torch
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
      t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
      if name.endswith('positional_embedding'):  # the Fourier matrix: official init is N(0, 1)
        t.copy_(torch.randn(t.shape, generator=gen))
    for module in model.modules():
      if isinstance(module, torch.nn.LayerNorm):
        module.weight.add_(1.0)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """(HF model, its save_pretrained directory)."""
  import torch
  from transformers import SamModel
  torch.manual_seed(0)
  model = SamModel(_hf_config()).eval()
  _randomise(model)
  for name, t in model.state_dict().items():
    assert t.numel() > 1 and t.std() > 0.02, f'{name} was not randomised'
  out = tmp_path_factory.mktemp('hf_sam')
  model.save_pretrained(out)
  return model, out


@pytest.fixture(scope='module')
def official(saved):
  import torch
  _, directory = saved
  sam = _official_model()
  converted = hf.hf_to_official(hf.read_safetensors(directory))
  state = {k: torch.from_numpy(v) for k, v in converted.items()}
  sam.load_state_dict(state, strict=True)
  return sam


def _rel_diff(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def test_image_embeddings_match(saved, official):
  import torch
  model, _ = saved
  pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    ours, theirs = official.image_encoder(pixels), model.get_image_embeddings(pixels)
  assert ours.shape == (1, PROMPT_DIM, EMBED, EMBED)
  assert _rel_diff(ours, theirs) < REL_TOL


# Prompts in the model input frame (0..IMAGE_SIZE), as both HF (after its processor) and the
# official decoder (after ResizeLongestSide) take them. Both shift by +0.5 and normalise by the
# input size the same way; with points but no box both append one "not a point" (label -1) at (0,0),
# with a box neither does, so every prompt kind here is comparable. HF's extra label -10 (processor
# padding, zero embedding) has no official counterpart and is not used.
POINTS = np.array([[60.0, 90.0], [180.0, 40.0]], np.float32)
LABELS = np.array([1, 0], np.int64)
BOX = np.array([30.0, 50.0, 200.0, 170.0], np.float32)
PROMPTS = {
    'points': dict(points=True),
    'box': dict(box=True),
    'points+box': dict(points=True, box=True),
    'points+mask': dict(points=True, mask=True),
}


@pytest.mark.parametrize('kind, multimask', [(k, True) for k in PROMPTS] + [('points', False)])
def test_masks_and_iou_match(saved, official, kind, multimask):
  import torch
  model, _ = saved
  use = PROMPTS[kind]
  gen = torch.Generator().manual_seed(2)
  pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
  mask_in = torch.randn(1, 1, 4 * EMBED, 4 * EMBED, generator=gen) if use.get('mask') else None
  points = torch.from_numpy(POINTS) if use.get('points') else None
  labels = torch.from_numpy(LABELS) if use.get('points') else None
  box = torch.from_numpy(BOX) if use.get('box') else None
  with torch.no_grad():
    # HF: points (B, point_batch, N, 2), labels (B, point_batch, N), boxes (B, n_boxes, 4).
    out = model(pixel_values=pixels,
                input_points=None if points is None else points[None, None],
                input_labels=None if labels is None else labels[None, None],
                input_boxes=None if box is None else box[None, None],
                input_masks=mask_in, multimask_output=multimask)
    # Official: points ((B, N, 2), (B, N)), boxes (B, 4), masks (B, 1, 4h, 4w).
    sparse, dense = official.prompt_encoder(
        points=None if points is None else (points[None], labels[None]),
        boxes=None if box is None else box[None], masks=mask_in)
    masks, iou = official.mask_decoder(
        image_embeddings=official.image_encoder(pixels),
        image_pe=official.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask)
  n = 3 if multimask else 1
  assert masks.shape == (1, n, 4 * EMBED, 4 * EMBED)
  assert _rel_diff(masks, out.pred_masks[:, 0]) < REL_TOL
  assert _rel_diff(iou, out.iou_scores[:, 0]) < REL_TOL


def test_keys_match_official_exactly(saved, official):
  converted = hf.hf_to_official(hf.read_safetensors(saved[1]))
  expected = official.state_dict()
  assert set(converted) == set(expected)
  for k, v in converted.items():
    assert v.dtype == np.float32 and v.shape == tuple(expected[k].shape), k


def test_positional_matrix_is_neither_scaled_nor_transposed(saved):
  model, directory = saved
  converted = hf.hf_to_official(hf.read_safetensors(directory))
  np.testing.assert_array_equal(converted[hf.OFFICIAL_PE],
                                model.shared_image_embedding.positional_embedding.detach().numpy())


def test_is_hf_state_dict(saved, official):
  assert hf.is_hf_state_dict(hf.read_safetensors(saved[1]))
  assert not hf.is_hf_state_dict(official.state_dict())
  assert not hf.is_hf_state_dict({})


def test_file_and_directory_read_the_same(saved):
  directory = saved[1]
  from_dir = hf.read_safetensors(directory)
  from_file = hf.read_safetensors(directory / hf.WEIGHTS_NAME)
  assert from_dir.keys() == from_file.keys()
  for k in from_dir:
    np.testing.assert_array_equal(from_dir[k], from_file[k])


def test_sharded_checkpoint(saved, tmp_path):
  model, directory = saved
  model.save_pretrained(tmp_path, max_shard_size='300KB')
  assert (tmp_path / hf.INDEX_NAME).is_file() and not (tmp_path / hf.WEIGHTS_NAME).exists()
  shards = set(json.loads((tmp_path / hf.INDEX_NAME).read_text())['weight_map'].values())
  assert len(shards) > 1
  whole, sharded = hf.read_safetensors(directory), hf.read_safetensors(tmp_path)
  assert sharded.keys() == whole.keys()
  for k in whole:
    np.testing.assert_array_equal(sharded[k], whole[k])
  assert hf.read_safetensors(tmp_path / hf.INDEX_NAME).keys() == whole.keys()
  (tmp_path / sorted(shards)[0]).unlink()
  with pytest.raises(FileNotFoundError, match=sorted(shards)[0]):
    hf.read_safetensors(tmp_path)


def test_bfloat16_file(tmp_path):
  import torch
  from safetensors.torch import save_file
  t = torch.randn(3, 5).to(torch.bfloat16)
  save_file({'vision_encoder.pos_embed': t, 'x': torch.arange(4)}, tmp_path / 'bf16.safetensors')
  read = hf.read_safetensors(tmp_path / 'bf16.safetensors')
  np.testing.assert_array_equal(read['vision_encoder.pos_embed'], t.float().numpy())
  np.testing.assert_array_equal(read['x'], np.arange(4))


def test_missing_and_empty_paths_name_the_path(tmp_path):
  missing = tmp_path / 'nowhere'
  with pytest.raises(FileNotFoundError, match='nowhere'):
    hf.read_safetensors(missing)
  empty = tmp_path / 'empty_dir'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match='empty_dir'):
    hf.read_safetensors(empty)
  (empty / 'pytorch_model.bin').write_bytes(b'')
  with pytest.raises(FileNotFoundError, match='pytorch_model.bin'):
    hf.read_safetensors(empty)
  bad = tmp_path / 'bad.safetensors'
  bad.write_bytes(b'not a safetensors file')
  with pytest.raises(ValueError, match='bad.safetensors'):
    hf.read_safetensors(bad)


def test_unknown_keys_are_kept(saved):
  tensors = dict(hf.read_safetensors(saved[1]))
  tensors['vision_encoder.layers.0.attn.extra'] = np.ones(3, np.float32)
  tensors['something_else'] = np.zeros(2, np.float32)
  converted = hf.hf_to_official(tensors)
  assert 'vision_encoder.layers.0.attn.extra' in converted
  assert 'something_else' in converted


def test_tied_positional_copy(saved):
  tensors = dict(hf.read_safetensors(saved[1]))
  pe = tensors[hf.SHARED_PE]
  both = hf.hf_to_official({**tensors, hf.PROMPT_PE: pe.copy()})
  assert hf.PROMPT_PE not in both
  np.testing.assert_array_equal(both[hf.OFFICIAL_PE], pe)
  only_copy = {k: v for k, v in tensors.items() if k != hf.SHARED_PE}
  only_copy[hf.PROMPT_PE] = pe
  np.testing.assert_array_equal(hf.hf_to_official(only_copy)[hf.OFFICIAL_PE], pe)
  with pytest.raises(ValueError, match='differs'):
    hf.hf_to_official({**tensors, hf.PROMPT_PE: pe + 1})
