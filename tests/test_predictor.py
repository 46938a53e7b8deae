"""SamPredictor behaviour beyond parity: input checks, batching, compile caching, bf16."""
from __future__ import annotations

import numpy as np
import pytest

from sam_jax import SamPredictor, sam_model_registry
from sam_jax.modeling.prompt_encoder import PAD_LABEL
from sam_jax.predictor import assemble_prompts, bucket


@pytest.fixture(scope='module')
def predictor():
  p = SamPredictor(sam_model_registry['vit_tiny'](seed=0))
  p.set_image(np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8))
  return p


POINT = dict(point_coords=np.array([[50.0, 60.0]]), point_labels=np.array([1]))


def test_output_types_and_shapes(predictor):
  masks, iou, low = predictor.predict(**POINT)
  assert masks.shape == (3, 120, 200) and masks.dtype == bool
  assert iou.shape == (3,) and iou.dtype == np.float32
  assert low.shape == (3, 64, 64) and low.dtype == np.float32
  masks, iou, low = predictor.predict(**POINT, multimask_output=False, return_logits=True)
  assert masks.shape == (1, 120, 200) and masks.dtype == np.float32
  assert iou.shape == (1,) and low.shape == (1, 64, 64)
  assert predictor.get_image_embedding().shape == (1, 64, 16, 16)


@pytest.mark.parametrize('image, message', [
    (np.zeros((50, 60), np.uint8), 'grayscale'),
    (np.zeros((50, 60, 4), np.uint8), 'RGBA'),
    (np.zeros((50, 60, 3), np.float32), 'uint8'),
    (np.zeros((1, 50, 60, 3), np.uint8), '3 dimensions'),
    (np.zeros((50, 60, 2), np.uint8), '3 channels'),
    (np.zeros((0, 60, 3), np.uint8), 'empty'),
    ([[1, 2, 3]], 'numpy array'),
])
def test_bad_images(image, message):
  p = SamPredictor(sam_model_registry['vit_tiny'](seed=0))
  with pytest.raises(ValueError, match=message):
    p.set_image(image)


def test_bad_image_format(predictor):
  with pytest.raises(ValueError, match='RGB'):
    predictor.set_image(np.zeros((8, 8, 3), np.uint8), image_format='HSV')


@pytest.mark.parametrize('kwargs, message', [
    (dict(point_coords=np.array([[500.0, 10.0]]), point_labels=np.array([1])), 'outside'),
    (dict(point_coords=np.array([[-1.0, 10.0]]), point_labels=np.array([1])), 'outside'),
    (dict(point_coords=np.array([[np.nan, 10.0]]), point_labels=np.array([1])), 'finite'),
    (dict(point_coords=np.array([[5.0, 10.0]]), point_labels=np.array([1, 0])), 'match'),
    (dict(point_coords=np.array([[5.0, 10.0]])), 'point_labels must be supplied'),
    (dict(point_labels=np.array([1])), 'point_labels must be supplied'),
    (dict(point_coords=np.array([5.0, 10.0]), point_labels=np.array([1])), r'\(N, 2\)'),
    (dict(point_coords=np.array([[5.0, 10.0]]), point_labels=np.array([3])), 'foreground'),
    (dict(box=np.array([1.0, 2.0, 3.0])), '4 numbers'),
    (dict(box=np.array([50.0, 2.0, 30.0, 40.0])), 'x0 <= x1'),
    (dict(box=np.array([0.0, 0.0, 300.0, 40.0])), 'outside'),
    (dict(mask_input=np.zeros((1, 256, 256))), r'\(1, 64, 64\)'),
])
def test_bad_prompts(predictor, kwargs, message):
  with pytest.raises(ValueError, match=message):
    predictor.predict(**kwargs)


def test_predict_before_set_image():
  p = SamPredictor(sam_model_registry['vit_tiny'](seed=0))
  with pytest.raises(ValueError, match='set_image'):
    p.predict(**POINT)
  with pytest.raises(ValueError, match='set_image'):
    p.get_image_embedding()


def test_reset_image(predictor):
  p = SamPredictor(predictor.model)
  p.set_image(np.zeros((30, 40, 3), np.uint8))
  p.reset_image()
  assert not p.is_image_set and p.features is None
  with pytest.raises(ValueError, match='set_image'):
    p.predict(**POINT)


def test_padding_slots_are_inert(predictor):
  """The same prompt padded to a longer bucket gives the same result."""
  coords, labels = assemble_prompts(np.array([[[30.0, 40.0]]]), np.array([[1]]), None, 1)
  assert labels.tolist() == [[1, -1]]
  longer_c = np.concatenate([coords, np.zeros((1, 6, 2), np.float32)], 1)
  longer_l = np.concatenate([labels, np.full((1, 6), -2, np.int32)], 1)
  model = predictor.model
  a = model.decode(predictor.features, coords, labels, multimask_output=True)
  b = model.decode(predictor.features, longer_c, longer_l, multimask_output=True)
  np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(a[1]), np.asarray(b[1]), atol=1e-6)


def test_bucketed_prompt_counts_do_not_recompile(predictor):
  assert [bucket(n) for n in (0, 1, 2, 3, 4, 5, 9)] == [2, 2, 2, 4, 4, 8, 16]
  rng = np.random.default_rng(1)
  predictor.predict(point_coords=np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
                    point_labels=np.array([1, 0, 1]))
  before = predictor.programs.predict._cache_size()
  for n in (1, 2, 3):  # n points + the padding point: 2, 3, 4 slots -> buckets 2 and 4
    predictor.predict(point_coords=rng.uniform(0, 100, (n, 2)), point_labels=np.ones(n))
  predictor.predict(box=np.array([10.0, 10.0, 90.0, 90.0]))  # 2 slots
  assert predictor.programs.predict._cache_size() - before <= 1  # at most the bucket-2 shape was new
  n_compiled = predictor.programs.predict._cache_size()
  for n in (1, 2, 3):
    predictor.predict(point_coords=rng.uniform(0, 100, (n, 2)), point_labels=np.ones(n))
  assert predictor.programs.predict._cache_size() == n_compiled


def test_min_prompt_len_pads_shorter_prompts_to_exactly_that_length():
  def length(points, min_len):
    coords, labels = assemble_prompts(np.zeros((3, points, 2)), np.ones((3, points), np.int32),
                                      None, 3, min_len)
    assert coords.shape == (3, labels.shape[1], 2) and (labels[:, points + 1:] == PAD_LABEL).all()
    return labels.shape[1]
  # n points + the "not a point" slot: exactly 10 up to 10 slots (eval.py's 9 clicks), then buckets
  assert [length(n, 10) for n in (1, 5, 8, 9, 10)] == [10, 10, 10, 10, 16]
  assert [length(n, 0) for n in (1, 3, 7, 9)] == [2, 4, 8, 16]


def test_encoder_compiles_once_for_all_image_sizes():
  p = SamPredictor(sam_model_registry['vit_tiny'](seed=0))
  p.set_image(np.zeros((100, 30, 3), np.uint8))
  n = p.programs.encode._cache_size()
  for shape in ((30, 100, 3), (64, 64, 3), (500, 20, 3)):
    p.set_image(np.zeros(shape, np.uint8))
  assert p.programs.encode._cache_size() == n


def test_predict_jax_batch_equals_single_predicts(predictor):
  pts = np.array([[[10.0, 20.0]], [[100.0, 50.0]], [[150.0, 90.0]]])
  labels = np.ones((3, 1))
  coords_in = predictor.transform.apply_coords(pts, predictor.original_size)
  masks, iou, low = predictor.predict_jax(coords_in, labels)
  assert masks.shape == (3, 3, 120, 200) and iou.shape == (3, 3) and low.shape == (3, 3, 64, 64)
  for i in range(3):
    m, s, l = predictor.predict(point_coords=pts[i], point_labels=labels[i])
    np.testing.assert_allclose(np.asarray(low[i]), l, atol=1e-5)
    np.testing.assert_allclose(np.asarray(iou[i]), s, atol=1e-6)
  with pytest.raises(ValueError, match='batch'):
    predictor.predict_jax(coords_in, labels, boxes=np.zeros((2, 4)))


def test_predict_jax_padding_keeps_the_image_pixels(predictor):
  """Masks padded to multiples of 128 with an 8-slot prompt: the image's pixels as unpadded, the
  padding no mask (logit 0)."""
  coords = predictor.transform.apply_coords(np.array([[[10.0, 20.0]], [[150.0, 90.0]]]),
                                            predictor.original_size)
  labels = np.ones((2, 1))
  exact, iou, _ = predictor.predict_jax(coords, labels, return_logits=True)
  padded, iou_p, _ = predictor.predict_jax(coords, labels, return_logits=True, pad_masks_to=128,
                                           min_prompt_len=8)
  assert padded.shape == (2, 3, 128, 256)
  np.testing.assert_allclose(np.asarray(padded[..., :120, :200]), np.asarray(exact), atol=1e-4)
  assert not np.asarray(padded[..., 120:, :]).any() and not np.asarray(padded[..., 200:]).any()
  np.testing.assert_allclose(np.asarray(iou_p), np.asarray(iou), atol=1e-6)


def test_bgr_equals_rgb(predictor):
  image = np.random.default_rng(3).integers(0, 255, (90, 70, 3), dtype=np.uint8)
  p = SamPredictor(predictor.model)
  p.set_image(image)
  a = p.predict(**POINT)
  p.set_image(image[..., ::-1], image_format='BGR')
  b = p.predict(**POINT)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_bfloat16_compute_close_to_float32(tmp_path):
  f32 = sam_model_registry['vit_tiny'](seed=5)
  bf16 = sam_model_registry['vit_tiny'](seed=5, dtype='bfloat16')
  image = np.random.default_rng(4).integers(0, 255, (128, 96, 3), dtype=np.uint8)
  out = []
  for sam in (f32, bf16):
    p = SamPredictor(sam)
    p.set_image(image)
    out.append(p.predict(**POINT, return_logits=True))
  assert out[1][0].dtype == np.float32  # outputs are float32 whatever the compute dtype
  scale = np.abs(out[0][2]).max()
  assert np.abs(out[0][2] - out[1][2]).max() < 0.1 * scale
  assert np.abs(out[0][1] - out[1][1]).max() < 0.05


def test_extreme_aspect_ratio_image(predictor):
  p = SamPredictor(predictor.model)
  p.set_image(np.zeros((1, 3000, 3), np.uint8))  # resizes to 1 x 256, not 0 x 256
  masks, _, _ = p.predict(point_coords=np.array([[10.0, 0.5]]), point_labels=np.array([1]))
  assert masks.shape == (3, 1, 3000)
