"""What fixes the training batches: dataset, order, per-image preprocessing, reading parallelism."""
from __future__ import annotations

import dataclasses
from typing import Any

from sam_jax.data import prompts

POINT_MODES = ('uniform', 'center')


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """Input pipeline settings; ``InputConfig(**config.data)`` from an ml_collections config."""
  # Which records, in which order.
  dataset: str = 'synthetic_shapes'  # 'sa1b', 'synthetic_shapes[/config]', 'coco_format/<name>',
                                     # 'segment_anything' (the TFDS catalogue's)
  data_dir: str | None = None        # default: $TFDS_DATA_DIR or ~/tensorflow_datasets
  split: str = 'train'               # TFDS split, slicing allowed ('train[:95%]')
  batch_size: int = 8                # images per batch, per process
  seed: int = 0                      # shuffle order and every random choice per image
  shuffle: bool = True
  num_epochs: int | None = None      # None: repeat forever (training); an int ends the stream and
                                     # pads the last batch (evaluation)
  # Per image (SAM paper, Appendix A).
  image_size: int = 1024             # the model's input side (SamConfig.image_size)
  max_masks: int = 64
  max_area_fraction: float = 0.9     # drop masks covering more of the image
  include_crowd: bool = False        # COCO iscrowd regions as targets (not by default)
  point_probability: float = 0.5     # first prompt: a point, else a noisy box
  point_mode: str = 'uniform'        # the point: 'uniform' over the mask (training), or 'center':
                                     # where the mask's interior distance transform peaks (the
                                     # paper's single-point evaluation)
  box_noise_fraction: float = 0.1
  box_noise_cap: float | None = None  # px in the input frame; None: 20 * image_size / 1024
  normalize: bool = True             # False: uint8 image, to be normalised on the device
  fast_jpeg: bool = False            # decode JPEGs at a reduced DCT scale (>= the resized size)
  # Reading: threads in this process, optional worker processes (Grain mp_prefetch).
  num_threads: int = 2
  prefetch_buffer_size: int | None = None  # elements read ahead; None: 2 batches
  worker_count: int = 0

  def __post_init__(self):
    if self.point_mode not in POINT_MODES:
      raise ValueError(f'point_mode {self.point_mode!r}: choose one of {POINT_MODES}')

  @property
  def low_res_size(self) -> int:
    """Side of the ground-truth masks: the decoder's low-resolution logits (image_size / 4)."""
    return self.image_size // 4

  @property
  def noise_cap(self) -> float:
    return (self.box_noise_cap if self.box_noise_cap is not None
            else prompts.default_noise_cap(self.image_size))

  def replace(self, **kw: Any) -> 'InputConfig':
    return dataclasses.replace(self, **kw)
