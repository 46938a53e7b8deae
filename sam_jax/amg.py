"""Automatic mask generation from the command line: the official ``scripts/amg.py``, same flags.

  python -m sam_jax.amg --input photos/ --output masks/ --model-type vit_b \
      --checkpoint sam_vit_b_01ec64.pth [--convert-to-rle] [--points-per-side 32 ...]

Per image: a folder of PNGs (one 0/255 mask each, named by index) and ``metadata.csv``, or with
--convert-to-rle one JSON list of COCO-RLE records. Reads images with OpenCV, as the official.
Without --checkpoint the model has random weights (a warning says so), so it runs offline.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

from sam_jax.build_sam import sam_model_registry

METADATA_HEADER = ('id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,'
                   'predicted_iou,stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h')
AMG_SETTINGS = {  # flag -> (type, help), passed to SamAutomaticMaskGenerator when given
    'points_per_side': (int, 'Generate masks by sampling a grid over the image with this many '
                        'points to a side.'),
    'points_per_batch': (int, 'How many input points to process simultaneously in one batch.'),
    'pred_iou_thresh': (float, 'Exclude masks with a predicted score from the model that is lower '
                        'than this threshold.'),
    'stability_score_thresh': (float, 'Exclude masks with a stability score lower than this '
                               'threshold.'),
    'stability_score_offset': (float, 'Larger values perturb the mask more when measuring '
                               'stability score.'),
    'box_nms_thresh': (float, 'The overlap threshold for excluding a duplicate mask.'),
    'crop_n_layers': (int, 'If >0, mask generation is run on smaller crops of the image to '
                      'generate more masks. The value sets how many different scales to crop at.'),
    'crop_nms_thresh': (float, 'The overlap threshold for excluding duplicate masks across '
                        'different crops.'),
    'crop_overlap_ratio': (float, 'Larger numbers mean image crops will overlap more (a fraction '
                           'of the short side; the official script parses it as an int).'),
    'crop_n_points_downscale_factor': (int, 'The number of points-per-side in each layer of crop '
                                       'is reduced by this factor.'),
    'min_mask_region_area': (int, 'Disconnected mask regions or holes with area smaller than this '
                             'value in pixels are removed by postprocessing.'),
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m sam_jax.amg',
      description='Runs automatic mask generation on an input image or directory of images, and '
      'outputs masks as either PNGs or COCO-style RLEs. Requires OpenCV.')
  parser.add_argument('--input', type=str, required=True,
                      help='Path to either a single input image or folder of images.')
  parser.add_argument('--output', type=str, required=True,
                      help='Path to the directory where masks will be output. Output will be '
                      'either a folder of PNGs per image or a single json with COCO-style masks.')
  parser.add_argument('--model-type', type=str, default='default',
                      choices=sorted(sam_model_registry),
                      help='The type of model to load.')
  parser.add_argument('--checkpoint', type=str, default=None,
                      help='The SAM checkpoint (official .pth, Hugging Face safetensors or a '
                      'sam_jax orbax directory); random weights when omitted.')
  parser.add_argument('--device', type=str, default=None,
                      help='Where to run: cpu, cuda / gpu (optionally :index) or tpu; jax\'s '
                      'default device when omitted or unavailable.')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                      help='bfloat16 (for accelerators) runs a copy of the model with its weights '
                      'cast to bfloat16 once; float32 (default) as the official script.')
  parser.add_argument('--convert-to-rle', action='store_true',
                      help='Save masks as COCO RLEs in a single json instead of as a folder of '
                      'PNGs. Requires pycocotools.')
  settings = parser.add_argument_group('AMG Settings')
  for name, (kind, text) in AMG_SETTINGS.items():
    settings.add_argument('--' + name.replace('_', '-'), type=kind, default=None, help=text)
  return parser


def write_masks_to_folder(masks: list[dict[str, Any]], path: str) -> None:
  """One PNG per mask (0 / 255) and metadata.csv, as the official script."""
  import cv2
  rows = [METADATA_HEADER]
  for i, record in enumerate(masks):
    cv2.imwrite(os.path.join(path, f'{i}.png'), record['segmentation'].astype(np.uint8) * 255)
    rows.append(','.join(map(str, [
        i, record['area'], *record['bbox'], *record['point_coords'][0],
        record['predicted_iou'], record['stability_score'], *record['crop_box']])))
  with open(os.path.join(path, 'metadata.csv'), 'w') as f:
    f.write('\n'.join(rows))


def list_targets(path: str) -> list[str]:
  """The image itself, or the files (not folders) directly in a folder, sorted."""
  if not os.path.isdir(path):
    return [path]
  return sorted(os.path.join(path, f) for f in os.listdir(path)
                if not os.path.isdir(os.path.join(path, f)))


def select_device(name: str | None):
  """The jax device for --device ("cuda:1" -> the second GPU), or None for jax's default."""
  import jax
  if name is None:
    return None
  platform, _, index = name.lower().partition(':')
  platform = {'cuda': 'gpu', 'rocm': 'gpu'}.get(platform, platform)
  try:
    return jax.devices(platform)[int(index or 0)]
  except (RuntimeError, IndexError, ValueError):
    print(f'--device {name} is not available; using {jax.devices()[0]}', file=sys.stderr)
    return None


def generate_all(generator, targets: list[str], output: str, rle: bool) -> int:
  """Writes the masks of each target; returns how many images were written."""
  import cv2
  from tqdm import tqdm
  done = 0
  for target in tqdm(targets, desc='images', unit='image'):
    image = cv2.imread(target)
    if image is None:
      tqdm.write(f"Could not load '{target}' as an image, skipping...")
      continue
    save_base = os.path.join(output, os.path.splitext(os.path.basename(target))[0])
    if os.path.exists(save_base + ('.json' if rle else '')):
      tqdm.write(f"'{save_base}' already exists (from another run or an image of the same name), "
                 f"skipping '{target}'...")
      continue
    masks = generator.generate(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    if rle:
      with open(save_base + '.json', 'w') as f:
        json.dump(masks, f)
    else:
      os.makedirs(save_base)
      write_masks_to_folder(masks, save_base)
    done += 1
  return done


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    import cv2  # noqa: F401
  except ImportError:
    print('python -m sam_jax.amg reads and writes images with OpenCV: '
          'pip install opencv-python-headless', file=sys.stderr)
    return 2
  import jax

  from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
  device = select_device(args.device)
  with jax.default_device(device):
    print('Loading model...')
    if args.checkpoint is None:
      print(f'warning: no --checkpoint: {args.model_type} has RANDOM weights, the masks are '
            'meaningless', file=sys.stderr)
    sam = sam_model_registry[args.model_type](checkpoint=args.checkpoint)
    settings = {k: v for k, v in vars(args).items() if k in AMG_SETTINGS and v is not None}
    generator = SamAutomaticMaskGenerator(
        sam, output_mode='coco_rle' if args.convert_to_rle else 'binary_mask',
        dtype=None if args.dtype == 'float32' else args.dtype, **settings)
    targets = list_targets(args.input)
    os.makedirs(args.output, exist_ok=True)
    done = generate_all(generator, targets, args.output, args.convert_to_rle)
  print(f'Done! {done} of {len(targets)} images written to {args.output}')
  return 0 if done else 1


if __name__ == '__main__':
  sys.exit(main())
