"""SA-1B-format data (one JPEG + one JSON per image, masks as COCO RLE) from a local folder.

  python -m sam_jax.data.build sa1b --data_dir ~/tensorflow_datasets --manual_dir /data/sa1b

``manual_dir`` holds SA-1B's ``.tar`` shards as downloaded (``sa_000000.tar`` ...), folders of
extracted ``<name>.jpg`` + ``<name>.json`` pairs (searched recursively), or both. Every pair becomes a
record of the ``train`` split (SA-1B has no other; hold images out by slicing, e.g.
``train[:99%]`` / ``train[99%:]``). Masks stay RLE strings; predicted_iou, stability_score,
point_coords, crop_box and bbox are kept as given. Bytes are stored as found: the input pipeline
judges them (a corrupt JPEG or a bad mask is skipped there and counted); only a pair whose JSON does
not parse, or whose image is missing, is left out here (logged).
"""
from __future__ import annotations

import json
import logging
import os
import tarfile
from typing import Any, Iterator

from etils import epath

from sam_jax.data import record

MANUAL_DOWNLOAD_INSTRUCTIONS = (
    'Download SA-1B (https://ai.meta.com/datasets/segment-anything-downloads) and pass the folder '
    'holding its .tar shards, or the extracted .jpg + .json files, as --manual_dir.')


def to_record(annotation: dict[str, Any], image: bytes, file_name: str) -> dict[str, Any]:
  """One SA-1B JSON (already parsed) + its JPEG bytes -> a record."""
  info = annotation['image']
  h, w = info.get('height', 0), info.get('width', 0)
  masks = [
      record.mask_entry(
          *record.compressed_rle(a['segmentation'], h, w), bbox=a.get('bbox'),
          area=a.get('area', 0), predicted_iou=a.get('predicted_iou', record.NO_VALUE),
          stability_score=a.get('stability_score', record.NO_VALUE),
          point_coords=a.get('point_coords'), crop_box=a.get('crop_box'), id=a.get('id', 0))
      for a in annotation.get('annotations', [])
  ]
  return record.make_record(image, masks, image_id=info.get('image_id', 0),
                            file_name=info.get('file_name', file_name),
                            height=h, width=w)


def _tar_pairs(path: epath.Path) -> Iterator[tuple[str, bytes | None, bytes | None]]:
  """(stem, jpg bytes, json bytes) of every image in a tar shard (by random access, one at a time)."""
  with path.open('rb') as f, tarfile.open(fileobj=f) as tar:
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    for m in tar.getmembers():
      if m.isfile():
        stem, ext = os.path.splitext(m.name)
        members.setdefault(stem, {})[ext.lower()] = m
    for stem in sorted(members):
      found = members[stem]
      if '.json' not in found and '.jpg' not in found:
        continue
      jpg, js = (tar.extractfile(found[e]).read() if e in found else None for e in ('.jpg', '.json'))
      yield stem, jpg, js


def _folder_pairs(folder: epath.Path, prefix: str = ''
                  ) -> Iterator[tuple[str, bytes | None, bytes | None]]:
  """(relative stem, jpg, json) for every .json under ``folder`` (level by level: works on GCS)."""
  children = sorted(folder.iterdir(), key=lambda p: p.name)
  names = {p.name for p in children}
  for p in children:
    if p.is_dir():
      yield from _folder_pairs(p, f'{prefix}{p.name}/')
    elif p.name.endswith('.json'):
      stem = p.name[:-len('.json')]
      jpg = folder / f'{stem}.jpg'
      yield prefix + stem, jpg.read_bytes() if f'{stem}.jpg' in names else None, p.read_bytes()


def iter_pairs(manual_dir: epath.Path) -> Iterator[tuple[str, bytes | None, bytes | None]]:
  """(key, jpg, json) over the tar shards and extracted folders of ``manual_dir``."""
  manual_dir = epath.Path(manual_dir)
  tars = sorted(p for p in manual_dir.iterdir() if p.name.endswith(('.tar', '.tar.gz', '.tgz')))
  for tar in tars:
    for stem, jpg, js in _tar_pairs(tar):
      yield f'{tar.name}/{stem}', jpg, js
  yield from _folder_pairs(manual_dir)


class Sa1b(record.RecordBuilder):
  """SA-1B-format images and masks (see module docstring)."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(dl_manager.manual_dir)}

  def _generate_examples(self, manual_dir):
    left_out = 0
    for key, jpg, js in iter_pairs(manual_dir):
      try:
        if jpg is None or js is None:
          raise ValueError('image or JSON missing')
        yield key, to_record(json.loads(js), jpg, os.path.basename(key) + '.jpg')
      except Exception as e:  # pylint: disable=broad-except  # one bad pair must not stop a build
        left_out += 1
        logging.warning('sa1b: leaving out %s: %s', key, e)
    if left_out:
      logging.warning('sa1b: %d pairs left out (see warnings above)', left_out)
