"""``python -m sam_jax.amg``: the official scripts/amg.py layout, unreadable files, RLE output."""
from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data

from sam_jax import amg

cv2 = pytest.importorskip('cv2')

FLAGS = ['--model-type', 'vit_tiny', '--points-per-side', '8', '--pred-iou-thresh', '0',
         '--stability-score-thresh', '0', '--crop-overlap-ratio', '0.25']


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  """A folder with two small photographs (PNG, JPEG), a corrupt file and a subfolder."""
  folder = tmp_path_factory.mktemp('images')
  coffee = cv2.resize(skimage.data.coffee(), (90, 60), interpolation=cv2.INTER_AREA)
  cv2.imwrite(str(folder / 'coffee.png'), cv2.cvtColor(coffee, cv2.COLOR_RGB2BGR))
  cv2.imwrite(str(folder / 'cat.jpg'), cv2.cvtColor(skimage.data.chelsea()[::6, ::6],
                                                     cv2.COLOR_RGB2BGR))
  (folder / 'broken.png').write_bytes(b'not an image')
  (folder / 'subfolder').mkdir()
  return folder


def run(args: list[str], capsys) -> tuple[int, str]:
  code = amg.main(args + FLAGS)
  out = capsys.readouterr()
  return code, out.out + out.err


def test_png_folders_and_metadata(images, tmp_path, capsys):
  code, log = run(['--input', str(images), '--output', str(tmp_path)], capsys)
  assert code == 0
  assert "Could not load" in log and 'broken.png' in log and 'RANDOM weights' in log
  assert sorted(p.name for p in tmp_path.iterdir()) == ['cat', 'coffee']
  for name, image in (('cat', images / 'cat.jpg'), ('coffee', images / 'coffee.png')):
    rows = (tmp_path / name / 'metadata.csv').read_text().split('\n')
    assert rows[0] == amg.METADATA_HEADER
    pngs = sorted(tmp_path.joinpath(name).glob('*.png'))
    assert len(rows) - 1 == len(pngs) >= 1
    h, w = cv2.imread(str(image)).shape[:2]
    for row in rows[1:]:
      fields = row.split(',')
      assert len(fields) == 14
      mask = cv2.imread(str(tmp_path / name / f'{fields[0]}.png'), cv2.IMREAD_UNCHANGED)
      assert mask.shape == (h, w) and mask.dtype == np.uint8
      assert set(np.unique(mask)) <= {0, 255} and int(fields[1]) == (mask > 0).sum()
      assert [int(v) for v in fields[10:]] == [0, 0, w, h]  # no crops: the whole image
  code, log = run(['--input', str(images), '--output', str(tmp_path)], capsys)
  assert code == 1 and 'already exists' in log  # never overwrites; nothing new written


def test_rle_json_decodes_to_the_png_masks(images, tmp_path, capsys):
  from pycocotools import mask as mask_utils
  image = images / 'coffee.png'
  code, _ = run(['--input', str(image), '--output', str(tmp_path / 'png')], capsys)
  assert code == 0
  code, _ = run(['--input', str(image), '--output', str(tmp_path / 'rle'), '--convert-to-rle',
                 '--device', 'cpu'], capsys)
  assert code == 0
  # bf16 weights: the same kind of output (values may differ slightly from float32's)
  code, _ = run(['--input', str(image), '--output', str(tmp_path / 'bf16'), '--convert-to-rle',
                 '--dtype', 'bfloat16'], capsys)
  assert code == 0 and json.loads((tmp_path / 'bf16' / 'coffee.json').read_text())
  with pytest.raises(SystemExit):  # argparse: an unknown dtype
    amg.main(['--input', str(image), '--output', str(tmp_path / 'x'), '--dtype', 'float16'])
  records = json.loads((tmp_path / 'rle' / 'coffee.json').read_text())
  assert records and sorted(records[0]) == ['area', 'bbox', 'crop_box', 'point_coords',
                                            'predicted_iou', 'segmentation', 'stability_score']
  for i, record in enumerate(records):
    png = cv2.imread(str(tmp_path / 'png' / 'coffee' / f'{i}.png'), cv2.IMREAD_UNCHANGED) > 0
    assert (mask_utils.decode(record['segmentation']).astype(bool) == png).all()
    assert record['area'] == png.sum()


def test_nothing_readable_and_unknown_device(tmp_path, capsys):
  (tmp_path / 'a.png').write_bytes(b'\x89PNG broken')
  code, log = run(['--input', str(tmp_path / 'a.png'), '--output', str(tmp_path / 'out'),
                   '--device', 'cuda:3'], capsys)
  assert code == 1 and 'a.png' in log and 'not available' in log
