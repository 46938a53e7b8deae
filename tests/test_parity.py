"""Parity with the official PyTorch SAM (segment-anything 1.0) on the same random weights.

Every tensor of the official model is randomised (relative-position tables and pos_embed included),
saved as .pth and loaded by both. vit_tiny runs at 256 px for speed; vit_b at 1024 is the full-size
check, from a transformers directory and a .pth of the same weights (marked slow, still part of
the suite). Images are non-square, of several aspect ratios.
"""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from conftest import PARITY_REPORT
from official_reference import official_sam, save_pth, to_numpy
from sam_jax import SamPredictor, sam_model_registry
from sam_jax.modeling.config import VARIANTS
from sam_jax.predictor import assemble_prompts

torch = pytest.importorskip('torch')


def photos():
  """Non-square RGB uint8 images: landscape 2:3, portrait ~1:2, panorama ~4.5:1."""
  coffee = skimage.data.coffee()  # (400, 600)
  portrait = np.ascontiguousarray(skimage.data.astronaut()[:, 100:352])  # (512, 252)
  panorama = np.ascontiguousarray(skimage.data.rocket()[200:341])  # (141, 640)
  return {'landscape': coffee, 'portrait': portrait, 'panorama': panorama}


def prompts(h: int, w: int):
  """Every prompt kind, in original-image pixels."""
  p1 = np.array([[0.45 * w, 0.55 * h]])
  p2 = np.array([[0.45 * w, 0.55 * h], [0.8 * w, 0.2 * h]])
  box = np.array([0.2 * w, 0.25 * h, 0.7 * w, 0.9 * h])
  return {
      'point': dict(point_coords=p1, point_labels=np.array([1])),
      'pos+neg points': dict(point_coords=p2, point_labels=np.array([1, 0])),
      'box': dict(box=box),
      'point+box': dict(point_coords=p1, point_labels=np.array([0]), box=box),
  }


class Pair:
  """The official model and ours, loaded from the same .pth."""

  def __init__(self, name, tmp_path_factory):
    self.name, self.cfg = name, VARIANTS[name]
    self.ref = official_sam(self.cfg, seed=1)
    path = save_pth(self.ref, tmp_path_factory.mktemp(name) / f'{name}.pth')
    self.ours = sam_model_registry[name](checkpoint=path)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  return Pair('vit_tiny', tmp_path_factory)


def compare(tag, ours, theirs, *, logits_rtol=1e-3, iou_atol=1e-4, agree=0.999):
  """ours / theirs: (masks, iou, low_res) from predict; records and checks the three targets."""
  masks_a, iou_a, low_a = ours
  masks_b, iou_b, low_b = theirs
  assert masks_a.shape == masks_b.shape and masks_a.dtype == masks_b.dtype
  assert iou_a.shape == iou_b.shape and low_a.shape == low_b.shape
  agreement = float((masks_a == masks_b).mean()) if masks_a.dtype == bool else float(
      (np.sign(masks_a) == np.sign(masks_b)).mean())
  iou_err = float(np.abs(iou_a - iou_b).max())
  scale = float(np.abs(low_b).max())
  logit_err = float(np.abs(low_a - low_b).max())
  PARITY_REPORT.append(f'{tag:<52} masks agree {agreement:.6%}  |dIoU| {iou_err:.1e}  '
                       f'|dlogit| {logit_err:.1e} (scale {scale:.2f}, rel {logit_err / scale:.1e})')
  assert agreement >= agree, tag
  assert iou_err <= iou_atol, tag
  assert logit_err <= logits_rtol * scale, tag


def run_predictors(pair, image, image_format='RGB'):
  from segment_anything import SamPredictor as OfficialPredictor
  ours, theirs = SamPredictor(pair.ours), OfficialPredictor(pair.ref)
  ours.set_image(image, image_format)
  with torch.no_grad():
    theirs.set_image(image, image_format)
  return ours, theirs


def check_image_embedding(tag, ours, theirs):
  a = np.asarray(ours.get_image_embedding())
  b = to_numpy(theirs.get_image_embedding())
  err, scale = float(np.abs(a - b).max()), float(np.abs(b).max())
  PARITY_REPORT.append(f'{tag:<52} image embedding |d| {err:.1e} (scale {scale:.2f})')
  assert a.shape == b.shape
  assert err <= 1e-4 * scale


def check_all_prompts(tag, ours, theirs, image):
  h, w = image.shape[:2]
  for kind, kw in prompts(h, w).items():
    for multimask in (True, False):
      a = ours.predict(**kw, multimask_output=multimask)
      with torch.no_grad():
        b = theirs.predict(**kw, multimask_output=multimask)
      compare(f'{tag} {kind} multimask={multimask}', a, b)
    # Refinement round: the previous best low-res logits as the mask prompt, logits returned.
    mask_input = b[2][np.argmax(b[1])][None]
    a = ours.predict(**kw, mask_input=mask_input, return_logits=True)
    with torch.no_grad():
      b = theirs.predict(**kw, mask_input=mask_input, return_logits=True)
    compare(f'{tag} {kind} +mask_input return_logits', a, b)


@pytest.mark.parametrize('photo', ['landscape', 'portrait', 'panorama'])
def test_tiny_predictor_matches_official(tiny, photo):
  image = photos()[photo]
  ours, theirs = run_predictors(tiny, image)
  check_image_embedding(f'vit_tiny {photo} {image.shape[:2]}', ours, theirs)
  check_all_prompts(f'vit_tiny {photo}', ours, theirs, image)


def test_tiny_bgr_matches_official(tiny):
  image = photos()['landscape'][..., ::-1].copy()
  ours, theirs = run_predictors(tiny, image, 'BGR')
  kw = prompts(*image.shape[:2])['point']
  with torch.no_grad():
    compare('vit_tiny BGR point', ours.predict(**kw), theirs.predict(**kw))


def test_tiny_modules_match_official(tiny):
  """Image encoder, prompt encoder and mask decoder one by one, on a batch of 2."""
  cfg, ref, ours = tiny.cfg, tiny.ref, tiny.ours
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  with torch.no_grad():
    emb_ref = to_numpy(ref.image_encoder(torch.from_numpy(x).permute(0, 3, 1, 2)))
  emb = np.asarray(ours.image_encoder(x)).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(emb, emb_ref, atol=1e-4 * np.abs(emb_ref).max())

  coords = rng.uniform(0, cfg.image_size, (2, 3, 2)).astype(np.float32)
  labels = np.array([[1, 0, -1], [0, 1, 1]], np.int32)
  masks = rng.standard_normal((2, cfg.low_res_size, cfg.low_res_size)).astype(np.float32)
  with torch.no_grad():
    sparse_ref, dense_ref = ref.prompt_encoder(
        (torch.from_numpy(coords), torch.from_numpy(labels)), None, torch.from_numpy(masks)[:, None])
  # The official encoder appends its "not a point" padding point when there is no box.
  coords_all, labels_all = assemble_prompts(coords, labels, None, batch=2)
  sparse, dense = ours.prompt_encoder(coords_all, labels_all, masks[..., None])
  np.testing.assert_allclose(np.asarray(sparse), to_numpy(sparse_ref), atol=1e-5)
  np.testing.assert_allclose(np.asarray(dense).transpose(0, 3, 1, 2), to_numpy(dense_ref),
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(ours.prompt_encoder.get_dense_pe()).transpose(0, 3, 1, 2),
                             to_numpy(ref.prompt_encoder.get_dense_pe()), atol=1e-5)

  with torch.no_grad():
    low_ref, iou_ref = ref.mask_decoder(
        image_embeddings=torch.from_numpy(emb_ref[:1]),
        image_pe=ref.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse_ref,
        dense_prompt_embeddings=dense_ref, multimask_output=True)
  low, iou = ours.mask_decoder(emb[:1].transpose(0, 2, 3, 1), ours.prompt_encoder.get_dense_pe(),
                               sparse, dense, multimask_output=True)
  np.testing.assert_allclose(np.asarray(low), to_numpy(low_ref),
                             atol=1e-4 * np.abs(to_numpy(low_ref)).max())
  np.testing.assert_allclose(np.asarray(iou), to_numpy(iou_ref), atol=1e-5)


@pytest.mark.slow
def test_vit_b_checkpoints_match_official_and_transformers(tmp_path):
  """Full-size vit_b at 1024: a random transformers SamModel saved with save_pretrained and the
  same weights as an official .pth give us the same model (the HF directory read with no PyTorch
  on our side), which matches the official predictor on every prompt kind and transformers' own
  masks. (One photo: each encoder run at 1024 costs ~25 s of CPU; vit_tiny above covers all three
  aspect ratios.)"""
  from test_hf_checkpoint import _randomise
  from test_train_resume import assert_same_tree, model_params
  from transformers import SamConfig as HFSamConfig
  from transformers import SamModel

  from sam_jax.checkpoints import hf
  # Official decoder LayerNorms use eps 1e-5; HF's config default is 1e-6 (not a weight).
  model = SamModel(HFSamConfig(mask_decoder_config=dict(layer_norm_eps=1e-5))).eval()
  _randomise(model)
  model.save_pretrained(tmp_path / 'hf')
  pair = Pair.__new__(Pair)
  pair.name, pair.cfg = 'vit_b', VARIANTS['vit_b']
  pair.ref = official_sam(pair.cfg)
  pair.ref.load_state_dict({k: torch.from_numpy(v) for k, v in
                            hf.hf_to_official(hf.read_safetensors(tmp_path / 'hf')).items()})
  pair.ours = sam_model_registry['vit_b'](checkpoint=tmp_path / 'hf')
  from_pth = sam_model_registry['vit_b'](checkpoint=save_pth(pair.ref, tmp_path / 'vit_b.pth'))
  from_hf = model_params(pair.ours)
  assert len(from_hf) > 100
  assert_same_tree(model_params(from_pth), from_hf)
  image = photos()['landscape']
  ours, theirs = run_predictors(pair, image)
  check_image_embedding('vit_b HF checkpoint landscape', ours, theirs)
  check_all_prompts('vit_b HF checkpoint landscape', ours, theirs, image)

  # Directly against transformers on the same embedding and a two-point prompt (input frame).
  with torch.no_grad():
    resized = torch.from_numpy(theirs.transform.apply_image(image)).permute(2, 0, 1)[None]
    emb = model.get_image_embeddings(theirs.model.preprocess(resized.float()))
    points = torch.tensor([[[[300.0, 400.0], [700.0, 200.0]]]])
    out = model(image_embeddings=emb, input_points=points, input_labels=torch.tensor([[[1, 0]]]),
                multimask_output=True)
  _, iou, low = ours.predict_jax(points[0].numpy(), np.array([[1, 0]]))
  hf_low, hf_iou = to_numpy(out.pred_masks[0]), to_numpy(out.iou_scores[0])
  rel = float(np.abs(np.asarray(low) - hf_low).max() / np.abs(hf_low).max())
  PARITY_REPORT.append(f'{"vit_b HF checkpoint vs transformers SamModel":<52} |dIoU| '
                       f'{np.abs(np.asarray(iou) - hf_iou).max():.1e}  |dlogit| rel {rel:.1e}')
  assert rel <= 1e-3
  np.testing.assert_allclose(np.asarray(iou), hf_iou, atol=1e-4)
