"""Training checkpoints: an orbax ``CheckpointManager`` in ``<workdir>/checkpoints``.

Each step directory holds two items: ``state`` (the whole train state: step, trainable params,
frozen rest, optimizer state, RNG) and ``data`` (the input pipeline's position, JSON). Saves are
asynchronous (the arrays are copied to host before ``save`` returns, so the next step may donate
them). A preemption notice makes the run save its latest step and stop: under ``jax.distributed``
through JAX's preemption service (``reached_preemption``: every host at the same step), outside it
on SIGTERM or Ctrl-C (``StopSignals``).
``<workdir>/sam_config.json`` records the model configuration, so ``sam_model_registry[variant](
checkpoint=workdir)`` loads the latest parameters, on one device, whatever mesh wrote them; so
does ``load_model(workdir)``, also from gs:// (paths go through ``etils.epath``, as orbax's do).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from sam_jax.checkpoints import orbax_io
from sam_jax.modeling.config import SamConfig

CHECKPOINTS_DIR = 'checkpoints'

log = logging.getLogger('sam_jax.train')


def as_path(path: str | os.PathLike) -> epath.Path:
  """A local path (made absolute, as orbax wants) or a URL such as gs://bucket/run."""
  p = epath.Path(path)
  return p if '://' in os.fspath(path) else p.absolute()


def write_model_config(workdir: str | os.PathLike, cfg: SamConfig, trainable: str) -> None:
  path = as_path(workdir) / orbax_io.CONFIG_FILE
  path.write_text(json.dumps({'model': cfg.to_dict(), 'format': 1, 'training': True,
                              'trainable': trainable}, indent=1))


def is_training_workdir(path: str | os.PathLike) -> bool:
  path = as_path(path)
  return (path / CHECKPOINTS_DIR).is_dir() and (path / orbax_io.CONFIG_FILE).is_file()


class Checkpointer:
  """Saves and restores (train state, input position) every ``every_steps`` steps."""

  def __init__(self, workdir: str | os.PathLike, every_steps: int, keep: int,
               async_save: bool = True):
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)  # saves a kill cut short
    self.manager = ocp.CheckpointManager(as_path(workdir) / CHECKPOINTS_DIR, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """(state with ``abstract_state``'s shardings, input pipeline state) of ``step``."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(abstract_state, restore_args=(
            ocp.checkpoint_utils.construct_restore_args(abstract_state))),
        data=ocp.args.JsonRestore()))
    return restored['state'], restored['data']

  def should_save(self, step: int, last: bool = False) -> bool:
    return last or step % self.every_steps == 0

  def reached_preemption(self, step: int) -> bool:
    """Under ``jax.distributed``: True at the step where every host saves after one of them got
    a preemption notice (SIGTERM, caught by JAX's preemption service). Call it at every step."""
    return self.manager.reached_preemption(step)

  def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                    data=ocp.args.JsonSave(data_state)),
                      force=True)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class StopSignals:
  """Catches ``signals`` from its creation until ``restore()``: the first sets ``received`` (its
  name) for the training loop to save the step under way and end; a second one does what it
  would have done before (SIGINT: KeyboardInterrupt; SIGTERM: the process ends). A cloud VM's or
  Kubernetes' preemption notice is a SIGTERM. Only the main thread can set handlers: elsewhere
  nothing is caught."""

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.received, self._previous = None, {}
    if threading.current_thread() is threading.main_thread():
      for s in signals:
        previous = signal.signal(s, self._handle)
        # (None: a handler set outside Python, which cannot be put back; the default instead)
        self._previous[s] = signal.SIG_DFL if previous is None else previous

  def restore(self) -> None:
    while self._previous:
      signal.signal(*self._previous.popitem())

  def _handle(self, signum: int, frame) -> None:
    if self.received:
      signal.signal(signum, self._previous.pop(signum))
      signal.raise_signal(signum)
      return
    self.received = signal.Signals(signum).name
    log.warning('%s: stopping once the step under way is saved (send it again to stop at once)',
                self.received)


def load_model_state(workdir: str | os.PathLike, abstract_state: nnx.State) -> nnx.State:
  """The latest checkpoint's parameters of a training workdir as a Sam model's whole state, on
  the default device (whatever mesh wrote them)."""
  from sam_jax.training.train_step import TRAINABLE
  workdir = as_path(workdir)
  trainable = json.loads((workdir / orbax_io.CONFIG_FILE).read_text()).get('trainable', 'all')
  with ocp.CheckpointManager(workdir / CHECKPOINTS_DIR,
                             options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'training workdir {workdir} has no checkpoint yet')
    params, frozen = nnx.split_state(abstract_state, TRAINABLE[trainable], ...)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    as_target = lambda tree: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
    target = {'params': as_target(params), 'frozen': as_target(frozen)}
    # Explicit restore args: without them orbax ignores the target's sharding and falls back to
    # the saved one, which fails when the checkpoint was written on other devices (a mesh).
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))['state']
  return nnx.merge_state(restored['params'], restored['frozen'])


def load_model(workdir: str | os.PathLike, *, dtype: str | None = None):
  """The latest checkpoint of a training workdir (local or gs://...) as a Sam model on one
  device, e.g. in a notebook; ``dtype``: compute dtype (parameters stay float32)."""
  from sam_jax.modeling.sam import Sam
  workdir = as_path(workdir)
  cfg = SamConfig.from_dict(json.loads((workdir / orbax_io.CONFIG_FILE).read_text())['model'])
  cfg = cfg.replace(dtype=dtype) if dtype else cfg
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: Sam(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, load_model_state(workdir, abstract_state))
