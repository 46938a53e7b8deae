"""Training metrics: TensorBoard event files and model FLOP utilisation."""
from __future__ import annotations

import os
import socket
import time
from typing import Mapping

import jax
import numpy as np

# Dense peak FLOP/s per device for MFU, by device kind (bf16 on accelerators; the CPU figure is
# what XLA reaches in f32 on this project's 2-core machine, see DESIGN.md).
PEAK_FLOPS = {
    'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'TPU v5p': 459e12, 'TPU v5 lite': 197e12,
    'TPU v5e': 197e12, 'TPU v4': 275e12, 'TPU v6 lite': 918e12, 'cpu': 165e9,
}


def peak_flops(device: jax.Device | None = None, override_tflops: float = 0.0) -> float:
  """Peak FLOP/s of one device: ``override_tflops`` if set, else from the device kind."""
  if override_tflops:
    return override_tflops * 1e12
  device = device or jax.devices()[0]
  kind = device.device_kind if device.platform != 'cpu' else 'cpu'
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return float('nan')


def encoder_flops(cfg) -> float:
  """Analytic forward FLOPs of the image encoder for one image (multiply-adds x 2): the patch
  embedding, every block's projections, MLP and attention (windowed blocks on the zero-padded
  windows, as the model computes them; relative positions included), and the neck. XLA's cost
  analysis counts a ``lax.scan`` body once, so the scanned blocks need this count.
  vit_h: 5.96 TFLOP, vit_b: 0.97 TFLOP."""
  c, g, ws = cfg.encoder_embed_dim, cfg.grid_size, cfg.window_size
  tokens = g * g
  padded = (-(-g // ws) * ws) ** 2  # windowed blocks pad the grid to whole windows
  groups, per_group = cfg.block_groups
  mlp = 2 * tokens * c * int(c * cfg.mlp_ratio) * 2

  def block(n_tokens, keys, side):
    projections = 2 * n_tokens * c * 4 * c  # qkv (3C) + proj (C)
    attention = 2 * n_tokens * keys * c * 2  # q.k and attn.v over all heads
    rel_pos = 2 * n_tokens * 2 * side * c  # q against the (side, d) tables, rows and columns
    return projections + attention + rel_pos + mlp

  windowed = block(padded, ws * ws, ws) * groups * (per_group - 1)
  global_ = block(tokens, tokens, g) * groups
  patch = 2 * tokens * 3 * cfg.patch_size ** 2 * c
  neck = 2 * tokens * (c * cfg.prompt_embed_dim + 9 * cfg.prompt_embed_dim ** 2)
  return float(patch + windowed + global_ + neck)


class MetricWriter:
  """Scalars to a TensorBoard event file under ``logdir`` (local or any ``etils.epath`` path, as
  the checkpoints); a no-op on processes other than 0.

  Written with tensorboard's record writer and event protos, as torch.utils.tensorboard does:
  ``tf.summary`` would import TensorFlow, 8 s of every run's start on a 2-core CPU.
  """

  def __init__(self, logdir: str | os.PathLike, active: bool = True):
    self._records = None
    if active:
      from etils import epath
      from tensorboard.summary.writer.record_writer import RecordWriter
      path = epath.Path(logdir)
      path.mkdir(parents=True, exist_ok=True)
      # TensorBoard reads the files whose name holds "tfevents"; a resumed run adds one.
      name = f'events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}'
      self._records = RecordWriter((path / name).open('wb'))
      self._write(file_version='brain.Event:2')

  def _write(self, **event) -> None:
    from tensorboard.compat.proto import event_pb2
    self._records.write(event_pb2.Event(wall_time=time.time(), **event).SerializeToString())

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._records is None:
      return
    from tensorboard.compat.proto import summary_pb2
    self._write(step=int(step), summary=summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()]))
    self._records.flush()

  def close(self) -> None:
    if self._records is not None:
      self._records.close()


def flatten_round_metrics(metrics: Mapping[str, np.ndarray]) -> dict[str, float]:
  """{'round/loss': (R,) ...} -> {'round_00/loss': ..., 'loss/first': ...}: one scalar each."""
  out = {}
  for k, v in metrics.items():
    v = np.asarray(v)
    if k.startswith('round/') and v.ndim == 1:
      name = k.split('/', 1)[1]
      for r, x in enumerate(v):
        out[f'round_{r:02d}/{name}'] = float(x)
    elif v.ndim == 0:
      out[k] = float(v)
  return out
