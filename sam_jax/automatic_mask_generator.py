"""``SamAutomaticMaskGenerator``: the official automatic mask generator (segment-anything 1.0), with
the heavy work in jitted JAX programs of fixed shapes.

Per image crop, the grid points go through one jitted program ``points_per_batch`` at a time (the
last batch padded with invalid points). It decodes three masks per point and, for the masks that
pass the IoU filter only (as the official), upsamples the logits to the crop's full resolution a
few masks at a time (at most ``MASK_CHUNK_BYTES`` of float32 logits live at once, never a whole
batch) to get stability scores and boxes; it returns per mask the predicted IoU, the stability
score, the box and whether the mask passes every filter. The host keeps only the low-resolution
logits of the masks that pass; after the crop's greedy NMS (on device) the survivors are upsampled
again to binary masks, pasted into the image frame and run-length encoded on the host, which is the
form the official generator stores them in. Compilations depend only on the crop and image sizes and
``points_per_batch`` (NMS arrays are padded to the most masks the settings can give): batches,
images of the same size and other thresholds reuse them. On accelerators the sizes are rounded up to
multiples of ``SIZE_BUCKET`` (the padding is masked out: records are unchanged), so that images of
nearby sizes share programs too; not on CPU, where the padding made ``generate`` 30% slower. One
image without crops compiles 5 programs (dense positional encoding, encoder, scoring, NMS, mask
pasting); with one crop layer 8 (a second size each for scoring, NMS and pasting). On CPU the
prompts of a batch are decoded one after another inside the program (``lax.map``), which is twice as
fast there as all at once.

``generate_batch(images)`` takes a list of images of any sizes: their crops go through the image
encoder several at a time (``SamPredictor.set_images``), then each image as ``generate``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sam_jax.modeling.sam import Sam, postprocess_masks
from sam_jax.predictor import (SamPredictor, assemble_prompts, check_image,
                               padded_postprocess_weights, round_up)
from sam_jax.utils.amg import (area_from_rle, box_xyxy_to_xywh, build_all_layer_point_grids,
                               coco_encode_rle, generate_crop_boxes, host_mask_to_box,
                               is_box_near_crop_edge, mask_to_box, mask_to_rle,
                               remove_small_regions, rle_to_mask, run_nms, stability_score)

OUTPUT_MODES = ('binary_mask', 'uncompressed_rle', 'coco_rle')
MASK_CHUNK_BYTES = 64 * 2**20  # at most this much full-resolution float32 logits at once
SIZE_BUCKET = 64  # on accelerators, crop and image sides are padded to multiples of this


class BatchResult(NamedTuple):
  """Per mask of one batch of points (3 masks per point, point-major)."""
  low_res: jax.Array  # (3P, L, L) logits
  iou: jax.Array  # (3P,) predicted IoU
  stability: jax.Array  # (3P,)
  boxes: jax.Array  # (3P, 4) int32 XYXY in the crop frame
  keep: jax.Array  # (3P,) bool: a real point, and passes the IoU, stability and crop-edge filters


class AmgPrograms(NamedTuple):
  """The jitted functions of the generator for one model structure (graphdef bound)."""
  score: Callable  # (state, features, image_pe, coords, labels, valid, weights, crop_box,
  #   orig_box, thresholds, *, one_at_a_time) -> BatchResult
  masks: Callable  # (low_res (M, L, L), n, weights, offset (2,), *, orig_size (H0', W0')) ->
  #   (M, W0', H0') bool: the first n binary masks pasted into a (padded) image frame, transposed


def chunk_size(h: int, w: int, n: int) -> int:
  """Masks upsampled at once so that their (chunk, H, W) float32 logits stay under the budget."""
  return max(1, min(n, MASK_CHUNK_BYTES // (4 * h * w)))


@functools.lru_cache(maxsize=16)
def amg_programs(graphdef: nnx.GraphDef) -> AmgPrograms:
  """Cached per model structure, like ``predictor.programs``."""

  def score(state, features, image_pe, coords, labels, valid, weights, crop_box, orig_box,
            thresholds, *, one_at_a_time) -> BatchResult:
    pred_iou_thresh, stability_thresh, stability_offset = thresholds
    model = nnx.merge(graphdef, state)

    def decode(coords, labels):  # (B, T, 2), (B, T) -> (B, 3, L, L), (B, 3)
      return model.decode(features, coords, labels, None, multimask_output=True,
                          image_pe=image_pe)

    if one_at_a_time:
      low_res, iou = jax.lax.map(lambda p: decode(p[0][None], p[1][None]), (coords, labels))
      low_res, iou = low_res[:, 0], iou[:, 0]  # (P, 1, 3, ...) -> (P, 3, ...)
    else:
      low_res, iou = decode(coords, labels)
    low_res = low_res.reshape(-1, *low_res.shape[2:])  # (P, 3, L, L) -> (3P, L, L)
    iou = iou.reshape(-1)  # (3P,)

    candidate = jnp.repeat(valid, 3) & ((pred_iou_thresh <= 0) | (iou > pred_iou_thresh))
    crop_hw = jnp.stack([crop_box[3] - crop_box[1], crop_box[2] - crop_box[0]])
    stability, boxes = full_res_stats(low_res, candidate, weights, stability_offset, crop_hw)
    keep = (candidate & ((stability_thresh <= 0) | (stability >= stability_thresh))
            & ~is_box_near_crop_edge(boxes, crop_box, orig_box))
    return BatchResult(low_res, iou, stability, boxes, keep)

  return AmgPrograms(jax.jit(score, static_argnames='one_at_a_time'),
                     jax.jit(binary_masks, static_argnames='orig_size'))


def full_res_stats(low_res: jax.Array, todo: jax.Array, weights, offset: jax.Array,
                   size: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Stability scores (n,) and boxes (n, 4) from the full-resolution logits of the masks of
  ``low_res`` (n, L, L) where ``todo`` (n,); zero elsewhere. ``weights`` may be padded past the
  crop's ``size`` (h, w): the padding counts as below every threshold.

  As the official computes stability only for the masks that pass the IoU filter, only
  ceil(sum(todo) / c) chunks of c masks are upsampled (the last chunk may repeat some masks).
  """
  n, h, w = low_res.shape[0], weights[0].shape[0], weights[2].shape[0]
  c = chunk_size(h, w, n)
  order = jnp.argsort(~todo, stable=True)  # the masks to do first
  inside = (jnp.arange(h)[:, None] < size[0]) & (jnp.arange(w)[None] < size[1])  # (H, W)

  def chunk(i, out):
    stability, boxes = out
    idx = jax.lax.dynamic_slice(order, (jnp.minimum(i * c, n - c),), (c,))
    logits = jnp.where(inside, postprocess_masks(low_res[idx], *weights), -jnp.inf)  # (c, H, W)
    return (stability.at[idx].set(stability_score(logits, Sam.mask_threshold, offset)),
            boxes.at[idx].set(mask_to_box(logits > Sam.mask_threshold)))

  n_chunks = (jnp.sum(todo) + c - 1) // c
  return jax.lax.fori_loop(0, n_chunks, chunk,
                           (jnp.zeros(n, jnp.float32), jnp.zeros((n, 4), jnp.int32)))


def binary_masks(low_res: jax.Array, n: jax.Array, weights, offset: jax.Array, *,
                 orig_size: tuple[int, int]) -> jax.Array:
  """The first ``n`` masks of ``low_res`` (M, L, L) thresholded at full resolution and pasted at
  ``offset`` (x0, y0) into an empty image of ``orig_size`` (H0, W0), transposed for column-major
  encoding: (M, W0, H0) bool, c masks at a time, masks past ``n`` left empty. Padded weights give
  empty padding, which must fit in the image: orig_size >= offset + the weights' (H, W)."""
  m = low_res.shape[0]
  c = chunk_size(weights[0].shape[0], weights[2].shape[0], m)

  def chunk(i, out):
    start = jnp.minimum(i * c, m - c)
    masks = postprocess_masks(jax.lax.dynamic_slice_in_dim(low_res, start, c),
                              *weights) > Sam.mask_threshold  # (c, h, w)
    pasted = jax.lax.dynamic_update_slice(jnp.zeros((c, *orig_size[::-1]), bool),
                                          jnp.swapaxes(masks, 1, 2), (0, offset[0], offset[1]))
    return jax.lax.dynamic_update_slice_in_dim(out, pasted, start, 0)

  return jax.lax.fori_loop(0, (n + c - 1) // c, chunk,
                           jnp.zeros((m, *orig_size[::-1]), bool))  # (M, W0, H0)


class SamAutomaticMaskGenerator:
  """Masks for a whole image from a grid of point prompts, filtered and de-duplicated."""

  def __init__(self, model: Sam, points_per_side: int | None = 32, points_per_batch: int = 64,
               pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
               stability_score_offset: float = 1.0, box_nms_thresh: float = 0.7,
               crop_n_layers: int = 0, crop_nms_thresh: float = 0.7,
               crop_overlap_ratio: float = 512 / 1500, crop_n_points_downscale_factor: int = 1,
               point_grids: list[np.ndarray] | None = None, min_mask_region_area: int = 0,
               output_mode: str = 'binary_mask', dtype: str | None = None) -> None:
    """Arguments and defaults as the official generator (tuned for ViT-H).

    points_per_side: grid points per side (points_per_side^2 prompts), or None with point_grids:
    one (N, 2) grid of (x, y) in [0, 1] per crop layer. points_per_batch: prompts decoded at once.
    pred_iou_thresh / stability_score_thresh: keep masks above these (0 disables the filter);
    stability_score_offset: the logit shift of the stability score. box_nms_thresh: box IoU above
    which NMS drops a duplicate within a crop; crop_nms_thresh: between crops. crop_n_layers: also
    run on (2^i)^2 crops for layers i = 1..n, overlapping by crop_overlap_ratio of the short side
    in layer 1, with points_per_side / crop_n_points_downscale_factor^i points a side.
    min_mask_region_area: if > 0, remove holes and islands smaller than this (needs OpenCV).
    output_mode: "binary_mask" (H, W) bool, "uncompressed_rle", or "coco_rle" (needs pycocotools).
    dtype: not official; as ``SamPredictor``'s ("bfloat16": weights cast once, for accelerators).
    """
    if (points_per_side is None) == (point_grids is None):
      raise ValueError('Exactly one of points_per_side or point_grids must be provided.')
    if points_per_side is not None:
      self.point_grids = build_all_layer_point_grids(points_per_side, crop_n_layers,
                                                     crop_n_points_downscale_factor)
    else:
      self.point_grids = [np.asarray(g, np.float64).reshape(-1, 2) for g in point_grids]
      if len(self.point_grids) < crop_n_layers + 1:
        raise ValueError(f'point_grids has {len(self.point_grids)} grids; crop_n_layers='
                         f'{crop_n_layers} needs one per layer ({crop_n_layers + 1})')
    if output_mode not in OUTPUT_MODES:
      raise ValueError(f'Unknown output_mode {output_mode!r}; choose one of {OUTPUT_MODES}')
    if output_mode == 'coco_rle':
      from pycocotools import mask as mask_utils  # noqa: F401
    if min_mask_region_area > 0:
      try:
        import cv2  # noqa: F401
      except ImportError as e:
        raise ImportError('min_mask_region_area > 0 needs OpenCV (pip install '
                          'opencv-python-headless), as the official generator') from e
    if points_per_batch < 1:
      raise ValueError(f'points_per_batch must be >= 1, got {points_per_batch}')

    self.predictor = SamPredictor(model, dtype)
    self.points_per_batch = points_per_batch
    self.pred_iou_thresh = pred_iou_thresh
    self.stability_score_thresh = stability_score_thresh
    self.stability_score_offset = stability_score_offset
    self.box_nms_thresh = box_nms_thresh
    self.crop_n_layers = crop_n_layers
    self.crop_nms_thresh = crop_nms_thresh
    self.crop_overlap_ratio = crop_overlap_ratio
    self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
    self.min_mask_region_area = min_mask_region_area
    self.output_mode = output_mode
    self.programs = amg_programs(nnx.graphdef(self.predictor.model))
    # On CPU the decoder runs ~2x faster one prompt at a time: a prompt's (g*g, C) image tokens
    # stay in cache, while a whole batch streams (P, g*g, C) activations through memory.
    leaves = jax.tree.leaves(self.predictor.state)
    self._one_at_a_time = all(d.platform == 'cpu' for leaf in leaves
                              for d in (leaf.devices() if isinstance(leaf, jax.Array)
                                        else jax.local_devices()[:1]))
    self._size_bucket = 1 if self._one_at_a_time else SIZE_BUCKET

  def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
    """Masks for an HxWx3 uint8 RGB image, as a list of records: segmentation (by output_mode),
    area (pixels), bbox (XYWH), predicted_iou, point_coords ([[x, y]]), stability_score, crop_box
    (XYWH)."""
    return self.generate_batch([image], batch_size=1)[0]

  def generate_batch(self, images: Sequence[np.ndarray],
                     batch_size: int = 8) -> list[list[dict[str, Any]]]:
    """``generate`` for each of a list of HxWx3 uint8 RGB images (any sizes): a list of record
    lists, equal to ``[generate(image) for image in images]`` (to float rounding).

    Not in the official API. The crops of consecutive images, up to ``batch_size`` of them (or one
    image's), go through the encoder together (``SamPredictor.set_images``), which pays on
    accelerators; on CPU it gains nothing per image.
    """
    images = [check_image(image) for image in images]
    crops = [generate_crop_boxes(im.shape[:2], self.crop_n_layers, self.crop_overlap_ratio)
             for im in images]
    out, start = [], 0
    while start < len(images):  # a group: as many images as fit their crops in one batch
      stop, n_crops = start + 1, len(crops[start][0])
      while stop < len(images) and n_crops + len(crops[stop][0]) <= batch_size:
        n_crops += len(crops[stop][0])
        stop += 1
      self.predictor.set_images([im[y0:y1, x0:x1] for im, (boxes, _) in
                                 zip(images[start:stop], crops[start:stop])
                                 for x0, y0, x1, y1 in boxes], batch_size=batch_size)
      first = 0  # the image's first crop in the predictor's images
      for image, (boxes, layers) in zip(images[start:stop], crops[start:stop]):
        out.append(self._records(image.shape[:2], boxes, layers, first))
        first += len(boxes)
      self.predictor.reset_image()
      start = stop
    return out

  def _records(self, orig_size: tuple[int, ...], crop_boxes: list[list[int]],
               layer_idxs: list[int], first: int) -> list[dict[str, Any]]:
    """The records of one image whose crops are the predictor's images first, first + 1, ..."""
    nms_size = sum(self._max_masks(layer) for layer in layer_idxs)
    data = self._generate_masks(orig_size, crop_boxes, layer_idxs, nms_size, first)
    if self.min_mask_region_area > 0:
      data = self._postprocess_small_regions(
          data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh),
          nms_size)
    if self.output_mode == 'coco_rle':
      segmentations = [coco_encode_rle(rle) for rle in data['rles']]
    elif self.output_mode == 'binary_mask':
      segmentations = [rle_to_mask(rle) for rle in data['rles']]
    else:
      segmentations = data['rles']
    return [{
        'segmentation': seg,
        'area': area_from_rle(rle),
        'bbox': box_xyxy_to_xywh(box).tolist(),
        'predicted_iou': float(iou),
        'point_coords': [point.tolist()],
        'stability_score': float(stab),
        'crop_box': box_xyxy_to_xywh(crop).tolist(),
    } for seg, rle, box, iou, point, stab, crop in zip(
        segmentations, data['rles'], data['boxes'], data['iou_preds'], data['points'],
        data['stability_score'], data['crop_boxes'])]

  # --- the official pipeline's stages ---------------------------------------------------------

  def _max_masks(self, layer_idx: int) -> int:
    """The most masks a crop of this layer can give: 3 per point, points padded to batches.
    NMS arrays are padded to such bounds, so their shapes repeat from image to image."""
    n, size = len(self.point_grids[layer_idx]), self.points_per_batch
    return 3 * size * -(-n // size)

  def _generate_masks(self, orig_size: tuple[int, ...], crop_boxes: list[list[int]],
                      layer_idxs: list[int], nms_size: int, first: int) -> dict[str, Any]:
    """Records of every crop, de-duplicated between crops (smaller crops preferred)."""
    pad = self._size_bucket
    canvas = tuple(round_up(max(b[i] + round_up(b[i + 2] - b[i], pad) for b in crop_boxes), pad)
                   for i in (1, 0))  # (H0', W0') >= every padded crop
    crops = [self._process_crop(first + i, box, layer, orig_size, canvas)
             for i, (box, layer) in enumerate(zip(crop_boxes, layer_idxs))]
    data = {k: concat([c[k] for c in crops]) for k in crops[0]}
    if len(crop_boxes) > 1:
      crop_area = ((data['crop_boxes'][:, 2] - data['crop_boxes'][:, 0])
                   * (data['crop_boxes'][:, 3] - data['crop_boxes'][:, 1]))
      scores = np.float32(1) / crop_area.astype(np.float32)
      data = select(data, run_nms(data['boxes'], scores, self.crop_nms_thresh, nms_size))
    return data

  def _process_crop(self, index: int, crop_box: list[int], layer_idx: int,
                    orig_size: tuple[int, ...], canvas: tuple[int, int]) -> dict[str, Any]:
    """Records of one crop (the predictor's image ``index``) after its NMS, in the image frame;
    masks are pasted into a ``canvas`` (H0', W0') >= the image, padded for fewer compilations."""
    x0, y0, x1, y1 = crop_box
    crop_size = (y1 - y0, x1 - x0)
    p = self.predictor
    cfg = p.model.config
    weights = jax.device_put(padded_postprocess_weights(
        cfg.low_res_size, cfg.image_size, p.input_sizes[index], crop_size, self._size_bucket))
    points = self.point_grids[layer_idx] * np.array(crop_size)[None, ::-1]  # (N, 2) (x, y)
    crop_arr = np.array(crop_box, np.int32)
    orig_arr = np.array([0, 0, orig_size[1], orig_size[0]], np.int32)
    thresholds = np.array([self.pred_iou_thresh, self.stability_score_thresh,
                           self.stability_score_offset], np.float32)
    parts = []
    for start in range(0, len(points), self.points_per_batch):
      batch = points[start:start + self.points_per_batch]
      coords, labels, valid = self._batch_prompts(batch, crop_size)
      out = self.programs.score(p.state, p.image_features(index), p.image_pe, coords, labels,
                                valid, weights, crop_arr, orig_arr, thresholds,
                                one_at_a_time=self._one_at_a_time)
      parts.append(survivors(out, batch))
    low_res = [part.pop('low_res') for part in parts]  # per batch: the kept (k, L, L)
    data = {k: concat([part[k] for part in parts]) for k in parts[0]}
    keep = run_nms(data['boxes'], data['iou_preds'], self.box_nms_thresh,
                   self._max_masks(layer_idx))
    data = select(data, keep)
    data['rles'] = self._encode(take_rows(low_res, keep), weights, crop_box, orig_size, canvas)
    data['boxes'] = data['boxes'] + np.array([x0, y0, x0, y0])
    data['points'] = data['points'] + np.array([x0, y0])
    data['crop_boxes'] = np.tile(np.array(crop_box, np.int64), (len(data['rles']), 1))
    return data

  def _batch_prompts(self, batch: np.ndarray,
                     crop_size: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One positive point per prompt, padded to ``points_per_batch`` prompts (padding invalid)."""
    n, size = len(batch), self.points_per_batch
    coords = np.zeros((size, 1, 2), np.float64)
    coords[:n, 0] = self.predictor.transform.apply_coords(batch, crop_size)
    coords, labels = assemble_prompts(coords, np.ones((size, 1), np.int32), None, size)
    return coords, labels, np.arange(size) < n

  def _encode(self, low_res: np.ndarray, weights, crop_box: list[int],
              orig_size: tuple[int, ...], canvas: tuple[int, int]) -> list[dict[str, Any]]:
    """Uncompressed RLEs in the image frame of the masks of ``low_res`` (n, L, L).

    Computed ``points_per_batch`` masks at a time (the last call padded), so the shape repeats."""
    size, (h, w) = self.points_per_batch, orig_size[:2]
    offset = np.array(crop_box[:2], np.int32)
    rles = []
    for start in range(0, len(low_res), size):
      chunk = low_res[start:start + size]
      padded = np.zeros((size, *chunk.shape[1:]), np.float32)
      padded[:len(chunk)] = chunk
      masks = np.asarray(self.programs.masks(padded, len(chunk), weights, offset,
                                            orig_size=canvas))  # (size, W0', H0')
      rles.extend(mask_to_rle(m[:w, :h]) for m in masks[:len(chunk)])
    return rles

  @staticmethod
  def _postprocess_small_regions(data: dict[str, Any], min_area: int, nms_thresh: float,
                                 nms_size: int) -> dict[str, Any]:
    """Removes holes and islands under ``min_area`` pixels, then NMS again, preferring masks
    that did not change (as the official)."""
    if len(data['rles']) == 0:
      return data
    masks, unchanged = [], []
    for rle in data['rles']:
      mask, holes_changed = remove_small_regions(rle_to_mask(rle), min_area, 'holes')
      mask, islands_changed = remove_small_regions(mask, min_area, 'islands')
      masks.append(mask)
      unchanged.append(not (holes_changed or islands_changed))
    boxes = np.stack([host_mask_to_box(m) for m in masks])
    keep = run_nms(boxes, np.array(unchanged, np.float32), nms_thresh, nms_size)
    data = dict(data, rles=list(data['rles']), boxes=data['boxes'].copy())
    for i in keep:
      if not unchanged[i]:
        data['rles'][i] = mask_to_rle(np.ascontiguousarray(masks[i].T))
        data['boxes'][i] = boxes[i]
    return select(data, keep)


def survivors(out: BatchResult, points: np.ndarray) -> dict[str, Any]:
  """The masks of one batch that pass the filters, as host arrays (official record names)."""
  idx = np.flatnonzero(np.asarray(out.keep))
  return {
      'low_res': np.asarray(out.low_res)[idx],
      'iou_preds': np.asarray(out.iou)[idx],
      'stability_score': np.asarray(out.stability)[idx],
      'boxes': np.asarray(out.boxes).astype(np.int64)[idx],
      'points': points[idx // 3],
  }


def concat(parts: list) -> Any:
  """Concatenates per-batch / per-crop record fields (lists or arrays)."""
  if isinstance(parts[0], list):
    return [x for part in parts for x in part]
  return np.concatenate(parts)


def take_rows(parts: list[np.ndarray], idx: np.ndarray) -> np.ndarray:
  """``np.concatenate(parts)[idx]`` without the concatenation."""
  offsets = np.cumsum([0] + [len(part) for part in parts])
  out = np.empty((len(idx), *parts[0].shape[1:]), parts[0].dtype)
  for part, start, stop in zip(parts, offsets[:-1], offsets[1:]):
    sel = (idx >= start) & (idx < stop)
    out[sel] = part[idx[sel] - start]
  return out


def select(data: dict[str, Any], idx: np.ndarray) -> dict[str, Any]:
  """The records at ``idx``, in that order."""
  return {k: [v[i] for i in idx] if isinstance(v, list) else v[idx] for k, v in data.items()}
