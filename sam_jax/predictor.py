"""``SamPredictor``: the official interactive-prediction API, backed by jitted JAX functions.

The image encoder is compiled once per model and image batch size (``set_images`` sends powers of
two, so at most log2(batch_size) + 1 sizes); the decoder + postprocess once per (prompt batch,
prompt-length bucket, image size): prompts are padded to the next power of two (or to a caller's
``min_prompt_len``) with inert PAD slots (see ``modeling.prompt_encoder``), which gives exactly the
unpadded result. ``SamPredictor(sam, dtype='bfloat16')`` runs a copy of the model whose weights were
cast to bfloat16 once (``modeling.sam.cast_for_inference``), for accelerators. Building a predictor
turns on jax's persistent compilation cache (``sam_jax.compilation_cache``), so a new process reuses
earlier compilations.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sam_jax.compilation_cache import enable_compilation_cache
from sam_jax.modeling.prompt_encoder import NOT_A_POINT_LABEL, PAD_LABEL
from sam_jax.modeling.sam import Sam, cast_for_inference, postprocess_masks, postprocess_weights
from sam_jax.utils.transforms import ResizeLongestSide, normalize_and_pad

BOX_LABELS = (2, 3)


class Programs(NamedTuple):
  """The jitted functions of one model structure (its graphdef bound)."""
  encode: Callable  # (state, images (B, S, S, 3)) -> image embeddings (B, g, g, C)
  dense_pe: Callable  # (state) -> the prompt encoder's (1, g, g, C) positional encoding
  predict: Callable  # (state, features, image_pe, coords, labels, mask_input, postprocess weights,
  #   *, multimask_output, return_logits) -> masks (B, C, H, W), IoU (B, C), low-res (B, C, L, L)


@functools.lru_cache(maxsize=16)
def programs(graphdef: nnx.GraphDef) -> Programs:
  """Cached per model structure: predictors of one model share compilations, and the graphdef is
  hashed once here rather than as a static argument on every call."""

  def encode(state, images):
    return nnx.merge(graphdef, state).embed_images(images)

  def dense_pe(state):
    return nnx.merge(graphdef, state).prompt_encoder.get_dense_pe()

  def predict(state, features, image_pe, coords, labels, mask_input, weights, *,
              multimask_output, return_logits):
    low_res, iou = nnx.merge(graphdef, state).decode(
        features, coords, labels, mask_input, multimask_output=multimask_output, image_pe=image_pe)
    masks = postprocess_masks(low_res, *weights)
    return (masks if return_logits else masks > Sam.mask_threshold), iou, low_res

  return Programs(jax.jit(encode), jax.jit(dense_pe),
                  jax.jit(predict, static_argnames=('multimask_output', 'return_logits')))


@jax.jit
def unstack(x: jax.Array) -> tuple[jax.Array, ...]:
  """(B, ...) -> B arrays (1, ...), in one program per B."""
  return tuple(x[i:i + 1] for i in range(x.shape[0]))


def chunk_sizes(n: int, batch_size: int) -> list[int]:
  """Encoder calls for n images: each the largest power of two <= batch_size of those left
  (n=13, batch_size=8: 8, 4, 1), so that no call computes padding images and few shapes compile."""
  largest = 1 << (max(batch_size, 1).bit_length() - 1)
  sizes = []
  while n > 0:
    sizes.append(min(largest, 1 << (n.bit_length() - 1)))
    n -= sizes[-1]
  return sizes


def bucket(n: int) -> int:
  """Prompt lengths are padded to a power of two (at least 2), so shapes repeat."""
  return max(2, 1 << max(n - 1, 0).bit_length())


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def padded_postprocess_weights(low_res_size: int, image_size: int, input_size: tuple[int, int],
                               original_size: tuple[int, int], pad_to: int = 1):
  """``postprocess_weights`` with the output rows and columns zero-padded to multiples of
  ``pad_to``, and the taps per row to a power of two: the image's own pixels are unchanged and
  the padding is logit 0 (no mask), so images of nearby sizes share one compiled program."""
  idx, row_w, cols = postprocess_weights(low_res_size, image_size, input_size, original_size)
  if pad_to <= 1:
    return idx, row_w, cols
  (h, k), w = idx.shape, cols.shape[0]  # (H, K) taps per output row, (W, L)
  rows_pad = ((0, round_up(h, pad_to) - h), (0, (1 << max(k - 1, 0).bit_length()) - k))
  return (np.pad(idx, rows_pad), np.pad(row_w, rows_pad),  # (H', K') each
          np.pad(cols, ((0, round_up(w, pad_to) - w), (0, 0))))  # (W', L)


def assemble_prompts(coords: np.ndarray | None, labels: np.ndarray | None,
                     boxes: np.ndarray | None, batch: int, min_len: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Official sparse-prompt order as one padded (B, T, 2) / (B, T) pair.

  Points, then the official "not a point" padding point when there is no box, then the two box
  corners (labels 2, 3), then PAD slots up to ``min_len`` when the prompt is no longer, else up to
  its bucket length.
  """
  parts_c, parts_l = [], []
  if coords is not None:
    parts_c.append(np.asarray(coords, np.float32))
    parts_l.append(np.asarray(labels, np.int32))
    if boxes is None:
      parts_c.append(np.zeros((batch, 1, 2), np.float32))
      parts_l.append(np.full((batch, 1), NOT_A_POINT_LABEL, np.int32))
  if boxes is not None:
    parts_c.append(np.asarray(boxes, np.float32).reshape(batch, 2, 2))
    parts_l.append(np.broadcast_to(np.array(BOX_LABELS, np.int32), (batch, 2)))
  n = sum(c.shape[1] for c in parts_c)
  pad = (min_len if 0 < n <= min_len else bucket(n)) - n
  parts_c.append(np.zeros((batch, pad, 2), np.float32))
  parts_l.append(np.full((batch, pad), PAD_LABEL, np.int32))
  return np.concatenate(parts_c, 1), np.concatenate(parts_l, 1)


def check_image(image: Any) -> np.ndarray:
  """A clear ValueError for anything but an HxWx3 uint8 numpy image."""
  if not isinstance(image, np.ndarray):
    raise ValueError(f'image must be a numpy array (H, W, 3) of uint8, got {type(image).__name__}')
  if image.ndim == 2:
    raise ValueError(f'image has shape {image.shape}: grayscale; SAM needs RGB (H, W, 3), e.g. '
                     'np.stack([image] * 3, axis=-1)')
  if image.ndim != 3:
    raise ValueError(f'image must have 3 dimensions (H, W, 3), got shape {image.shape}')
  if image.shape[2] == 4:
    raise ValueError(f'image has shape {image.shape}: RGBA; drop the alpha channel with '
                     'image[..., :3] (or composite it onto a background) first')
  if image.shape[2] != 3:
    raise ValueError(f'image must have 3 channels (H, W, 3), got shape {image.shape}')
  if image.dtype != np.uint8:
    raise ValueError(f'image must be uint8 in [0, 255], got dtype {image.dtype}; convert e.g. '
                     'with (np.clip(image, 0, 1) * 255).astype(np.uint8)')
  if image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f'image is empty: shape {image.shape}')
  return image


class SamPredictor:
  """Computes image embeddings once, then masks for any number of prompts on those images.

  One image: ``set_image(image)`` then ``predict(...)``, as the official. Many (any sizes):
  ``set_images(images)`` encodes them in batches, then ``predict(..., image_index=i)`` per image,
  e.g. ``[predictor.predict(box=b, image_index=i) for i, b in enumerate(boxes)]``.
  """

  def __init__(self, sam_model: Sam, dtype: str | None = None):
    """dtype: None runs ``sam_model`` as it is; "bfloat16" (for accelerators) a copy whose weights
    are cast once to bfloat16 (``modeling.sam.cast_for_inference``); outputs stay float32."""
    enable_compilation_cache()
    if dtype is not None:
      sam_model = cast_for_inference(sam_model, dtype)
    self.model = sam_model
    self.transform = ResizeLongestSide(sam_model.image_size)
    graphdef, self._state = nnx.split(sam_model)
    self.programs = programs(graphdef)
    self._image_pe = self.programs.dense_pe(self._state)
    self.reset_image()

  def set_image(self, image: np.ndarray, image_format: str = 'RGB') -> None:
    """Encodes an HxWx3 uint8 image (``image_format`` "RGB" or "BGR")."""
    self.set_images([image], image_format)

  def set_images(self, images: Sequence[np.ndarray], image_format: str = 'RGB',
                 batch_size: int = 8) -> None:
    """Encodes HxWx3 uint8 images of any sizes, up to ``batch_size`` per encoder call; then
    ``predict(..., image_index=i)`` prompts image i.

    Each image is resized to longest side S and padded as by ``set_image``, so all share one input
    shape; calls take powers of two (``chunk_sizes``). Embeddings equal ``set_image``'s to float
    rounding. On CPU batches do not run faster per image; on a GPU they do (vit_h bf16 on an H100:
    38 ms at batch 1, 31 ms per image at batch 8).
    """
    if image_format not in ('RGB', 'BGR'):
      raise ValueError(f'image_format must be "RGB" or "BGR", got {image_format!r}')
    if len(images) == 0:
      raise ValueError('images is empty')
    resized, sizes = [], []
    for image in images:
      image = check_image(image)
      if image_format != self.model.image_format:
        image = image[..., ::-1]
      resized.append(self.transform.apply_image(np.ascontiguousarray(image)))
      sizes.append(image.shape[:2])
    self._encode(resized, sizes, batch_size)

  def set_jax_image(self, transformed_image: np.ndarray | jax.Array,
                    original_image_size: tuple[int, ...]) -> None:
    """Like the official ``set_torch_image``: (1, h, w, 3) already resized to longest side S."""
    s = self.model.image_size
    if transformed_image.ndim != 4 or transformed_image.shape[0] != 1 or \
        transformed_image.shape[3] != 3 or max(transformed_image.shape[1:3]) != s:
      raise ValueError(f'transformed_image must be (1, h, w, 3) with longest side {s}, got shape '
                       f'{transformed_image.shape}')
    self._encode([np.asarray(transformed_image[0])], [original_image_size], 1)

  def _encode(self, resized: list[np.ndarray], original_sizes: list[tuple[int, ...]],
              batch_size: int) -> None:
    """Encodes images already resized to longest side S, ``chunk_sizes`` of them per call."""
    self.reset_image()
    s, start, features = self.model.image_size, 0, []
    for n in chunk_sizes(len(resized), batch_size):
      x = np.stack([normalize_and_pad(im, s) for im in resized[start:start + n]])  # (n, S, S, 3)
      out = self.programs.encode(self._state, x)  # (n, g, g, C)
      features.extend([out] if n == 1 else unstack(out))
      start += n
    self._features = features
    self.original_sizes = [tuple(int(v) for v in size[:2]) for size in original_sizes]
    self.input_sizes = [tuple(int(v) for v in im.shape[:2]) for im in resized]
    self.is_image_set = True

  def predict(self, point_coords: np.ndarray | None = None, point_labels: np.ndarray | None = None,
              box: np.ndarray | None = None, mask_input: np.ndarray | None = None,
              multimask_output: bool = True, return_logits: bool = False, *,
              image_index: int = 0):
    """Masks (C, H, W), IoU predictions (C,), low-res logits (C, L, L) as numpy, like the official.

    point_coords (N, 2) (x, y) pixels of the original image with point_labels (N,) (1 foreground,
    0 background); box (4,) XYXY; mask_input (1, L, L) logits from an earlier call; image_index:
    which image of ``set_images``.
    """
    self._check_image_set(image_index)
    original_size = self.original_sizes[image_index]
    coords = labels = boxes = masks = None
    if point_coords is not None or point_labels is not None:
      if point_coords is None or point_labels is None:
        raise ValueError('point_labels must be supplied with point_coords (and vice versa)')
      point_coords = np.asarray(point_coords, np.float64)
      point_labels = np.asarray(point_labels)
      if point_coords.ndim != 2 or point_coords.shape[1] != 2:
        raise ValueError(f'point_coords must be (N, 2) (x, y), got shape {point_coords.shape}')
      if point_labels.shape != (point_coords.shape[0],):
        raise ValueError(f'point_labels must be ({point_coords.shape[0]},) to match point_coords '
                         f'{point_coords.shape}, got shape {point_labels.shape}')
      if not np.isin(point_labels, (0, 1, NOT_A_POINT_LABEL)).all():
        raise ValueError(f'point_labels must be 1 (foreground), 0 (background) or -1 (ignored), '
                         f'got {np.unique(point_labels).tolist()}')
      self._check_inside(point_coords, 'point_coords', original_size)
      coords = self.transform.apply_coords(point_coords, original_size)[None]
      labels = point_labels.astype(np.int32)[None]
    if box is not None:
      box = np.asarray(box, np.float64)
      if box.size != 4 or box.ndim > 2:
        raise ValueError(f'box must be 4 numbers (x0, y0, x1, y1), got shape {box.shape}')
      box = box.reshape(4)
      self._check_inside(box.reshape(2, 2), 'box', original_size)
      if box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f'box must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1, got {box}')
      boxes = self.transform.apply_boxes(box, original_size)
    if mask_input is not None:
      size = self.model.config.low_res_size
      masks = np.asarray(mask_input, np.float32)
      if masks.shape != (1, size, size):
        raise ValueError(f'mask_input must be (1, {size}, {size}) low-res logits (as returned by '
                         f'predict), got shape {masks.shape}')
    out = self.predict_jax(coords, labels, boxes, masks, multimask_output, return_logits,
                           image_index=image_index)
    return tuple(np.asarray(a)[0] for a in out)

  def predict_jax(self, point_coords=None, point_labels=None, boxes=None, mask_input=None,
                  multimask_output: bool = True, return_logits: bool = False, *,
                  pad_masks_to: int = 1, min_prompt_len: int = 0, image_index: int = 0):
    """Batched prompts in the model's input frame (the official ``predict_torch``).

    point_coords (B, N, 2), point_labels (B, N), boxes (B, 4), mask_input (B, 1, L, L) or (B, L, L).
    Returns jax arrays: masks (B, C, H, W), IoU predictions (B, C), low-res logits (B, C, L, L).
    To compile fewer programs over many images and prompt lengths (this module's docstring):
    ``pad_masks_to`` pads H and W to multiples of it (padding reads as no mask / logit 0), and
    ``min_prompt_len`` pads a prompt of at most that many tokens with inert slots to exactly that
    many (one program for all of a protocol's clicks; a longer prompt goes to its power-of-two
    bucket). image_index: which image of ``set_images`` (coordinates in its input frame,
    ``input_sizes[image_index]``).
    """
    self._check_image_set(image_index)
    batch = next((len(a) for a in (point_coords, boxes, mask_input) if a is not None), 1)
    if point_coords is not None:
      if point_labels is None or np.shape(point_labels) != np.shape(point_coords)[:2]:
        raise ValueError(f'point_labels must be (B, N) matching point_coords (B, N, 2) '
                         f'{np.shape(point_coords)}, got {np.shape(point_labels)}')
    for name, a in (('point_coords', point_coords), ('boxes', boxes), ('mask_input', mask_input)):
      if a is not None and len(a) != batch:
        raise ValueError(f'{name} has batch {len(a)}, other prompts have batch {batch}')
    coords, labels = assemble_prompts(point_coords, point_labels, boxes, batch, min_prompt_len)
    if mask_input is not None:
      size = self.model.config.low_res_size
      mask_input = jnp.asarray(mask_input, jnp.float32).reshape(batch, size, size)
    weights = padded_postprocess_weights(self.model.config.low_res_size, self.model.image_size,
                                         self.input_sizes[image_index],
                                         self.original_sizes[image_index], pad_masks_to)
    return self.programs.predict(self._state, self._features[image_index], self._image_pe,
                                 coords, labels, mask_input, weights,
                                 multimask_output=bool(multimask_output),
                                 return_logits=bool(return_logits))

  @property
  def state(self) -> nnx.State:
    """The model's parameters as one pytree (``nnx.split``), for jitted programs of your own that
    take them as an argument, like ``programs``."""
    return self._state

  @property
  def image_pe(self) -> jax.Array:
    """The prompt encoder's dense positional encoding (1, g, g, C), computed once."""
    return self._image_pe

  @property
  def features(self) -> jax.Array | None:
    """The image embeddings (N, g, g, C) of the N images set (channels last), or None."""
    if not self.is_image_set:
      return None
    return self._features[0] if len(self._features) == 1 else jnp.concatenate(self._features)

  def image_features(self, image_index: int = 0) -> jax.Array:
    """The embedding (1, g, g, C) of one image of ``set_images``."""
    self._check_image_set(image_index)
    return self._features[image_index]

  @property
  def original_size(self) -> tuple[int, int] | None:
    """(H, W) of the image set (the first one after ``set_images``); ``original_sizes`` has all."""
    return self.original_sizes[0] if self.original_sizes else None

  @property
  def input_size(self) -> tuple[int, int] | None:
    """(h, w) of the image set, resized to longest side S (the first one after ``set_images``)."""
    return self.input_sizes[0] if self.input_sizes else None

  def get_image_embedding(self) -> jax.Array:
    """The image embeddings (N, C, g, g) (N = 1 after ``set_image``), in the official
    channel-first layout."""
    self._check_image_set()
    return jnp.transpose(self.features, (0, 3, 1, 2))

  def reset_image(self) -> None:
    self.is_image_set = False
    self._features = []
    self.original_sizes = []
    self.input_sizes = []

  def _check_image_set(self, image_index: int = 0) -> None:
    if not self.is_image_set:
      raise ValueError('An image must be set with .set_image(...) before mask prediction.')
    if not 0 <= image_index < len(self._features):
      raise ValueError(f'image_index {image_index} out of range: {len(self._features)} image(s) '
                       'set')

  @staticmethod
  def _check_inside(xy: np.ndarray, name: str, original_size: tuple[int, int]) -> None:
    h, w = original_size
    if not np.isfinite(xy).all():
      raise ValueError(f'{name} must be finite, got {xy.tolist()}')
    outside = (xy[:, 0] < 0) | (xy[:, 0] > w) | (xy[:, 1] < 0) | (xy[:, 1] > h)
    if outside.any():
      raise ValueError(f'{name} {xy[outside].tolist()} lie outside the {w}x{h} (width x height) '
                       'image; coordinates are (x, y) pixels of the original image')
