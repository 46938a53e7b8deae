"""The training input pipeline: Grain over a TFDS data source, batches of numpy arrays.

  records (ArrayRecord, random access) -> global shuffle by seed, a new order every epoch ->
  this process's share (every process_count-th element, from process_index) -> read + preprocess
  (``num_threads`` threads, optionally ``worker_count`` processes) -> batches of ``batch_size``
  images, skipped records counted

Batch, per process (B = batch_size, S = image_size, L = S / 4 = low_res_size, M = max_masks):

  key            shape         dtype    content
  image          (B, S, S, 3)  float32  normalised, zero-padded bottom/right (uint8, not normalised,
                                        when normalize=False)
  input_size     (B, 2)        int32    (h, w) of the resized image inside the S x S frame
  original_size  (B, 2)        int32    (H, W) of the stored image
  image_id       (B,)          int32    -1 for a padding image
  masks          (B, M, L, L)  bool     ground truth on the decoder's low-res grid (the padded frame)
  mask_valid     (B, M)        bool     the slot holds a mask (padding images: none)
  prompt_coords  (B, M, 2, 2)  float32  first prompt, [x, y] in the input frame
  prompt_labels  (B, M, 2)     int32    point [1, -1] | box [2, 3] | empty slot [-1, -1]
  gt_boxes       (B, M, 4)     float32  exact box [x0, y0, x1, y1] in the input frame

``batch_spec(config)`` gives the same as ``jax.ShapeDtypeStruct``s. Every array is numpy with the
process's images first: ``jax.make_array_from_process_local_data(sharding, batch[key])`` makes the
global batch. The element at stream position i is the same whatever the process count, thread count
or worker count: its record comes from the seeded shuffle, its random choices from (seed, i).

Position: ``get_state()`` is a JSON-serialisable dict (elements consumed, batches given, counters);
``set_state(state)`` on a pipeline with the same config resumes with exactly the next batch.
"""
from __future__ import annotations

import math
import threading
from typing import Any

import grain
import jax
from absl import flags
import numpy as np

from sam_jax.data import preprocess, sources
from sam_jax.data.config import InputConfig
from sam_jax.data.preprocess import batch_spec  # noqa: F401 - part of this module's API

STATE_VERSION = 1


class ReadAndPreprocess:
  """(stream position, record index) -> (example | None, counts); opens its source lazily, so it
  pickles into Grain worker processes without the open files."""

  def __init__(self, cfg: InputConfig):
    self._cfg = cfg
    self._source = None
    self._lock = threading.Lock()

  def __getstate__(self) -> dict[str, Any]:
    return {'cfg': self._cfg}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state['cfg'])

  @property
  def source(self):
    with self._lock:
      if self._source is None:
        self._source = sources.open_source(self._cfg.dataset, self._cfg.data_dir, self._cfg.split)
      return self._source

  def __call__(self, position: int, record_index: int):
    rng = np.random.default_rng([self._cfg.seed, position])
    return preprocess.safe_preprocess(lambda: self.source[int(record_index)], rng, self._cfg)


class InputPipeline:
  """Iterator of batches (see module docstring) whose position is part of the training state."""

  def __init__(self, cfg: InputConfig, *, process_index: int | None = None,
               process_count: int | None = None):
    self.config = cfg
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f'process_index {self.process_index} not in [0, {self.process_count})')
    self._read = ReadAndPreprocess(cfg)
    self.num_records = len(self._read.source)  # DatasetNotBuiltError names the build command
    if not self.num_records:
      raise ValueError(f'{cfg.dataset} split {cfg.split!r} has no records')
    self._position = 0  # elements of this process's stream consumed
    self._batches = 0
    self._counters = dict.fromkeys(preprocess.COUNTERS, 0)
    self._iterator = None

  @property
  def num_batches(self) -> int | None:
    """Batches per process for a finite stream (the same on every process), None when endless."""
    if self.config.num_epochs is None:
      return None
    per_process = math.ceil(self.num_records * self.config.num_epochs / self.process_count)
    return math.ceil(per_process / self.config.batch_size)

  def stream(self) -> grain.MapDataset:
    """This process's elements, (example | None, counts) each, by stream position."""
    ds = grain.MapDataset.range(self.num_records)
    if self.config.shuffle:
      ds = ds.shuffle(seed=self.config.seed)  # index_shuffle: reseeded with the epoch
    ds = ds.repeat(self.config.num_epochs)
    ds = ds.map_with_index(self._read)  # index: position in the global stream
    return ds[self.process_index::self.process_count]

  def _next_element(self):
    if self._iterator is None:
      cfg = self.config
      buffer = cfg.prefetch_buffer_size or 2 * cfg.batch_size
      ds = self.stream()[self._position:].to_iter_dataset(
          grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=buffer))
      if cfg.worker_count:
        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; outside app.run (tests,
          flags.FLAGS.mark_as_parsed()   # notebooks) their defaults are what they would get
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
      self._iterator = iter(ds)
    return next(self._iterator)

  def __iter__(self) -> 'InputPipeline':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    cfg = self.config
    if self.num_batches is not None and self._batches >= self.num_batches:
      raise StopIteration
    examples, skipped_in_a_row = [], 0
    while len(examples) < cfg.batch_size:
      try:
        example, counts = self._next_element()
      except StopIteration:
        break  # a finite stream ran out: pad below
      self._position += 1
      for k, v in counts.items():
        self._counters[k] += v
      if example is None:
        skipped_in_a_row += 1
        if skipped_in_a_row > max(self.num_records, 1000):
          raise RuntimeError(f'No usable record in {skipped_in_a_row} reads of {cfg.dataset} '
                             f'{cfg.split}: {self.metrics()}')
        continue
      skipped_in_a_row = 0
      examples.append(example)
    examples += [preprocess.empty_example(cfg)] * (cfg.batch_size - len(examples))
    self._batches += 1
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

  def metrics(self) -> dict[str, int]:
    """Counters since the start of training (restored with the state): images / masks read,
    skipped and why (``preprocess.COUNTERS``)."""
    return dict(self._counters)

  def _fingerprint(self) -> dict[str, Any]:
    cfg = self.config
    return {'dataset': cfg.dataset, 'split': cfg.split, 'seed': cfg.seed, 'shuffle': cfg.shuffle,
            'num_epochs': cfg.num_epochs, 'batch_size': cfg.batch_size,
            'process_index': self.process_index, 'process_count': self.process_count,
            'num_records': self.num_records}

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: restoring it gives exactly the batches that would come next."""
    return {'version': STATE_VERSION, 'position': self._position, 'batches': self._batches,
            'counters': dict(self._counters), 'fingerprint': self._fingerprint()}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get('version') != STATE_VERSION:
      raise ValueError(f'Unknown input pipeline state version {state.get("version")}')
    mine = self._fingerprint()
    theirs = state['fingerprint']
    differ = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
    if differ:
      raise ValueError('The saved input position belongs to another pipeline (saved, now): '
                       f'{differ}; resuming it would not continue the same data order')
    self.close()
    self._position = int(state['position'])
    self._batches = int(state['batches'])
    self._counters = dict.fromkeys(preprocess.COUNTERS, 0)
    self._counters.update({k: int(v) for k, v in state['counters'].items()})

  def close(self) -> None:
    """Stops reading threads / worker processes (a later ``next`` starts them again)."""
    if self._iterator is not None:
      close = getattr(self._iterator, 'close', None)
      if close:
        close()
      self._iterator = None
