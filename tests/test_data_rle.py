"""RLE masks read from their runs agree with pycocotools' full decode."""
from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from sam_jax.data import fake_data, rle


def random_masks(rng, h, w, n):
  """(n, h, w) bool: blobs of every size, plus empty, full, a corner pixel and a full column."""
  masks = np.stack([fake_data.blob_mask(rng, h, w) for _ in range(n)])
  masks[0] = False
  masks[1] = True
  masks[2] = False
  masks[2, 0, 0] = True
  masks[3] = False
  masks[3, :, w // 2] = True
  masks[3, : h // 2, w // 2 + 1] = True
  return masks


def encode_all(masks):
  rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
  return [r['counts'] for r in rles], np.array([r['size'] for r in rles])


def exact_area_average(mask, scale_y, scale_x, out):
  """Reference: the mask as unit squares, mapped by the scales and averaged over unit cells."""
  def weights(n, s):
    lo = np.arange(n) * s
    cells = np.arange(out)[:, None]
    return np.clip(np.minimum(lo + s, cells + 1) - np.maximum(lo, cells), 0, None)  # (out, n)
  return weights(mask.shape[0], scale_y) @ mask.astype(np.float64) @ weights(mask.shape[1], scale_x).T


@pytest.mark.parametrize('h, w', [(7, 5), (64, 64), (45, 80), (150, 97)])
def test_areas_boxes_points_match_full_decode(h, w):
  rng = np.random.default_rng(h * w)
  masks = random_masks(rng, h, w, 12)
  counts, sizes = encode_all(masks)
  runs = rle.parse(counts, sizes)
  assert runs.valid.all()
  np.testing.assert_array_equal(runs.areas, masks.sum(axis=(1, 2)))
  chosen = rng.permutation(np.flatnonzero(runs.areas))
  fg = rle.ForegroundRuns.select(runs, chosen)
  for box, i in zip(fg.boxes(), chosen):
    ys, xs = np.nonzero(masks[i])
    np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max(), ys.max()])
  for _ in range(5):
    for (x, y), i in zip(fg.sample_pixels(rng).astype(int), chosen):
      assert masks[i, y, x]


def test_sampled_pixels_are_uniform():
  mask = np.zeros((10, 10), bool)
  mask[2:4, 3:6] = True  # 6 pixels
  mask[8, 8] = True      # and a 7th far away
  counts, sizes = encode_all(mask[None])
  fg = rle.ForegroundRuns.select(rle.parse(counts, sizes), [0] * 7000)  # 7000 draws at once
  xy = fg.sample_pixels(np.random.default_rng(0)).astype(int)
  hits = np.zeros((10, 10))
  np.add.at(hits, (xy[:, 1], xy[:, 0]), 1)
  assert (hits[~mask] == 0).all()
  np.testing.assert_allclose(hits[mask], 1000, atol=5 * np.sqrt(1000))


@pytest.mark.parametrize('h, w, out, sy, sx', [
    (64, 64, 16, 0.25, 0.25),        # exact 4x4 blocks
    (150, 97, 16, 0.1, 16 / 97),     # fractional, non-square
    (45, 80, 64, 0.9, 0.8),          # cells smaller than... about a pixel
    (9, 12, 32, 2.5, 2.5),           # upsampling (an image smaller than the grid)
])
def test_low_res_is_the_exact_area_average(h, w, out, sy, sx):
  rng = np.random.default_rng(out)
  masks = random_masks(rng, h, w, 10)
  counts, sizes = encode_all(masks)
  runs = rle.parse(counts, sizes)
  chosen = np.flatnonzero(runs.areas)
  fg = rle.ForegroundRuns.select(runs, chosen)
  binary, coverage = fg.low_res(np.tile([sy, sx], (len(chosen), 1)), out)
  np.testing.assert_array_equal(binary, fg.low_res_masks(np.tile([sy, sx], (len(chosen), 1)), out))
  for b, c, i in zip(binary, coverage, chosen):
    ref = exact_area_average(masks[i], sy, sx, out)
    np.testing.assert_allclose(c, ref, atol=1e-5)
    if ref.max() >= 0.5:
      np.testing.assert_array_equal(b[np.abs(ref - 0.5) > 1e-4], ref[np.abs(ref - 0.5) > 1e-4] > 0.5)
    else:  # too small to cover half a cell: keeps its most covered cell
      assert b.any() and (c[b] >= ref.max() - 1e-5).all()


def test_malformed_strings_are_flagged_not_decoded():
  good, size = encode_all(np.eye(4, dtype=bool)[None])
  cases = {
      'good': good[0],
      'empty': b'',
      'bad character': b'0 1',
      'ends inside a number': good[0] + b'o',  # 'o' = 63: continuation bit set
      'runs too short': b'12',
      'runs too long': good[0] + b'1',
      'negative run': b'd0L',  # 20, then -4: the right total
      'overlong number': b'ooooooooo0',
  }
  runs = rle.parse(list(cases.values()), np.repeat(size, len(cases), axis=0))
  assert dict(zip(cases, runs.valid.tolist())) == {k: k == 'good' for k in cases}
  assert runs.areas[0] == 4 and (runs.areas[1:] == 0).all()
