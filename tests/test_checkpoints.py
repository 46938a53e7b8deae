"""Loading the four checkpoint forms, and clear errors for checkpoints that do not fit."""
from __future__ import annotations

import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from official_reference import official_sam, save_pth
from sam_jax import SamConfig, sam_model_registry
from sam_jax.checkpoints import CheckpointError, official, orbax_io
from sam_jax.modeling.config import VARIANTS

torch = pytest.importorskip('torch')


def leaves(model):
  return jax.tree.leaves(nnx.state(model))


def same_params(a, b) -> bool:
  la, lb = leaves(a), leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.fixture(scope='module')
def tiny_pth(tmp_path_factory):
  ref = official_sam(VARIANTS['vit_tiny'], seed=4)
  return ref, save_pth(ref, tmp_path_factory.mktemp('pth') / 'tiny.pth')


def test_random_init_is_deterministic_per_seed():
  a, b = sam_model_registry['vit_tiny'](seed=1), sam_model_registry['vit_tiny'](seed=1)
  c = sam_model_registry['vit_tiny'](seed=2)
  assert same_params(a, b)
  assert not same_params(a, c)


def test_pth_loads_every_tensor_exactly(tiny_pth):
  ref, path = tiny_pth
  sam = sam_model_registry['vit_tiny'](checkpoint=path)
  back = official.to_official(nnx.state(sam), sam.config)
  expected = {k: v.numpy() for k, v in ref.state_dict().items()}
  assert sorted(back) == sorted(expected)
  for k in expected:
    np.testing.assert_array_equal(back[k], expected[k], err_msg=k)


def test_convert_cli_writes_orbax_that_loads_the_same(tiny_pth, tmp_path):
  _, path = tiny_pth
  out = tmp_path / 'orbax'
  subprocess.run([sys.executable, '-m', 'sam_jax.convert', '--model-type', 'vit_tiny',
                  '--checkpoint', path, '--output', str(out)], check=True)
  assert orbax_io.read_config(out) == VARIANTS['vit_tiny']
  assert same_params(sam_model_registry['vit_tiny'](checkpoint=out),
                     sam_model_registry['vit_tiny'](checkpoint=path))


def test_orbax_round_trip_of_random_model(tmp_path):
  sam = sam_model_registry['vit_tiny'](seed=7)
  orbax_io.save(tmp_path / 'ckpt', sam.config, nnx.state(sam))
  assert same_params(sam_model_registry['vit_tiny'](checkpoint=tmp_path / 'ckpt'), sam)
  # The compute dtype is not part of the weights: a bf16 model loads the same checkpoint.
  bf16 = sam_model_registry['vit_tiny'](checkpoint=tmp_path / 'ckpt', dtype='bfloat16')
  assert bf16.config.dtype == 'bfloat16' and same_params(bf16, sam)


def test_orbax_checkpoint_of_another_model_is_refused(tmp_path):
  sam = sam_model_registry['vit_tiny'](seed=0)
  orbax_io.save(tmp_path / 'ckpt', sam.config, nnx.state(sam))
  with pytest.raises(CheckpointError, match='holds a vit_tiny model.*not the requested vit_b'):
    sam_model_registry['vit_b'](checkpoint=tmp_path / 'ckpt')


def test_checkpoint_of_another_size_names_both(tiny_pth):
  _, path = tiny_pth
  wider = VARIANTS['vit_tiny'].replace(encoder_embed_dim=192)
  from sam_jax.build_sam import build_sam
  with pytest.raises(CheckpointError) as e:
    build_sam(wider, path)
  msg = str(e.value)
  assert 'looks like vit_tiny (embed_dim 96, depth 4)' in msg
  assert 'wrong shape tensors: image_encoder.blocks.0.attn.proj.bias: checkpoint (96,), ' \
         'model (192,)' in msg


def test_missing_unexpected_and_misshapen_tensors_are_listed(tiny_pth, tmp_path):
  ref, _ = tiny_pth
  sd = dict(ref.state_dict())
  del sd['mask_decoder.iou_token.weight']
  sd['mask_decoder.extra.weight'] = torch.zeros(3)
  sd['prompt_encoder.no_mask_embed.weight'] = torch.zeros(1, 5)
  path = tmp_path / 'bad.pth'
  torch.save(sd, path)
  with pytest.raises(CheckpointError) as e:
    sam_model_registry['vit_tiny'](checkpoint=path)
  msg = str(e.value)
  assert 'missing tensors: mask_decoder.iou_token.weight' in msg
  assert 'unexpected tensors: mask_decoder.extra.weight' in msg
  assert 'wrong shape tensors: prompt_encoder.no_mask_embed.weight: checkpoint (1, 5), ' \
         'model (1, 64)' in msg


def test_unreadable_and_unknown_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere.pth'):
    sam_model_registry['vit_tiny'](checkpoint=tmp_path / 'nowhere.pth')
  corrupt = tmp_path / 'corrupt.pth'
  corrupt.write_bytes(b'not a checkpoint at all')
  with pytest.raises(CheckpointError, match='corrupt.pth'):
    sam_model_registry['vit_tiny'](checkpoint=corrupt)
  other = tmp_path / 'weights.h5'
  other.write_bytes(b'x')
  with pytest.raises(CheckpointError, match='unknown checkpoint format'):
    sam_model_registry['vit_tiny'](checkpoint=other)


def test_pth_without_torch_says_which_extra(tiny_pth, monkeypatch):
  _, path = tiny_pth
  monkeypatch.setitem(sys.modules, 'torch', None)  # import torch now raises ImportError
  with pytest.raises(ImportError, match=r'sam-jax\[torch\].*safetensors'):
    sam_model_registry['vit_tiny'](checkpoint=path)


def test_hf_directory_loads_into_our_model(tmp_path):
  """A transformers SamModel shaped like vit_tiny, loaded by the registry from its directory."""
  from test_hf_checkpoint import _randomise
  from transformers import SamConfig as HFSamConfig
  from transformers import SamModel

  from sam_jax.checkpoints import hf
  cfg = VARIANTS['vit_tiny']
  hf_cfg = HFSamConfig(
      vision_config=dict(hidden_size=cfg.encoder_embed_dim, output_channels=cfg.prompt_embed_dim,
                         num_hidden_layers=cfg.encoder_depth,
                         num_attention_heads=cfg.encoder_num_heads, image_size=cfg.image_size,
                         window_size=cfg.window_size,
                         global_attn_indexes=list(cfg.encoder_global_attn_indexes),
                         num_pos_feats=cfg.prompt_embed_dim // 2),
      prompt_encoder_config=dict(hidden_size=cfg.prompt_embed_dim, image_size=cfg.image_size,
                                 mask_input_channels=cfg.mask_in_chans),
      mask_decoder_config=dict(hidden_size=cfg.prompt_embed_dim, mlp_dim=cfg.decoder_mlp_dim,
                               num_attention_heads=cfg.decoder_num_heads,
                               iou_head_hidden_dim=cfg.iou_head_hidden_dim))
  model = SamModel(hf_cfg)
  _randomise(model)
  model.save_pretrained(tmp_path)
  sam = sam_model_registry['vit_tiny'](checkpoint=tmp_path)
  sam_file = sam_model_registry['vit_tiny'](checkpoint=tmp_path / 'model.safetensors')
  assert same_params(sam, sam_file)
  expected = hf.hf_to_official(hf.read_safetensors(tmp_path))
  back = official.to_official(nnx.state(sam), sam.config)
  for k in expected:
    np.testing.assert_array_equal(back[k], expected[k], err_msg=k)
  from sam_jax.build_sam import build_sam
  deeper = cfg.replace(encoder_depth=6, encoder_global_attn_indexes=(2, 5))
  # Without config.json, the tensors' shapes say which size the checkpoint is.
  alone = tmp_path / 'alone'
  alone.mkdir()
  shutil.copy(tmp_path / hf.WEIGHTS_NAME, alone)
  with pytest.raises(CheckpointError, match='looks like vit_tiny'):
    build_sam(deeper, alone)
  # With it (in the directory, or beside the file), every field that differs is named: the head
  # counts too, which show in no tensor's shape.
  with pytest.raises(CheckpointError, match='num_hidden_layers = 4, the model has encoder_depth'):
    build_sam(deeper, tmp_path)
  for heads in (dict(decoder_num_heads=4), dict(encoder_num_heads=1, decoder_num_heads=8)):
    for checkpoint in (tmp_path, tmp_path / hf.WEIGHTS_NAME):
      with pytest.raises(CheckpointError, match='config.json describes another model') as e:
        build_sam(cfg.replace(**heads), checkpoint)
      assert str(e.value).count('num_attention_heads') == len(heads)
      for field, value in heads.items():
        assert f'the model has {field} = {value}' in str(e.value)


def test_every_parameter_has_logical_axes():
  sam = nnx.eval_shape(lambda: sam_model_registry['vit_tiny']())
  for path, var in nnx.to_flat_state(nnx.state(sam, nnx.Param)):
    axes = var.get_metadata().get('out_sharding')
    assert axes is not None and len(axes) == len(var.shape), (path, axes, var.shape)


def test_global_attention_pattern_must_group():
  with pytest.raises(ValueError, match='evenly spaced'):
    SamConfig(64, 4, 2, (0, 3)).block_groups
