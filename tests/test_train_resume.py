"""train.py end to end, as a user runs it: killed mid-step or mid-save it resumes to the very same
parameters (bitwise, on CPU) as an uninterrupted run; stopped by SIGTERM it first saves the step
under way, and resumes the same; a non-finite loss stops the run (exit code 3)
keeping a finite checkpoint, or is skipped; a decoder-only run leaves the encoder untouched and
keeps no optimizer state for it; a training workdir loads in the inference API; the metrics reach
TensorBoard; a finished run is evaluated again without training.

Every run is a `python train.py` subprocess on a tiny synthetic dataset (vit_tiny, 2 images x 4
masks, 3 prompt rounds, 6 steps). Compiling the train step dominates (about a minute of CPU per
distinct program), so the runs share a JAX persistent compilation cache, and the runs no test
waits to start (decoder-only, the two non-finite ones) go one after another in a background thread
beside the tests' own (the reference, then the crash tests): at most two train.py at once.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / '.venv' / 'bin' / 'python'
PYTHON = str(PYTHON) if PYTHON.exists() else sys.executable
STEPS = 6
RUN_TIMEOUT = 900      # s, one train.py run (a cold compile on a busy 2-core machine: minutes)
BASE = ('--config=configs/tiny.py:smoke', '--config.data.dataset=synthetic_shapes/resume',
        f'--config.num_steps={STEPS}', '--config.num_rounds=3', '--config.eval_rounds=1',
        '--config.eval_max_batches=1', '--config.checkpoint_every_steps=2',
        '--config.data.batch_size=2', '--config.data.max_masks=4')
NAN_LR = '--config.optimizer.learning_rate=1e30'  # tiny.py warms up over 100 steps: step 1 moves
                                                  # nothing, step 2 by ~1e28, then the loss is NaN
TMP_MARK = '.orbax-checkpoint-tmp'


# ----------------------------------------------------------------------------- running train.py

class Env:
  def __init__(self, root: Path):
    from sam_jax.data import build
    self.root = root
    data = root / 'data'
    build.build('synthetic_shapes', str(data), config='resume', image_size=256, num_train=16,
                num_validation=2, seed=3)
    cache = os.environ.get('JAX_COMPILATION_CACHE_DIR') or str(root / 'jax_cache')
    # config.data.data_dir defaults to None, which ml_collections cannot override from the command
    # line; the pipeline's default data dir is $TFDS_DATA_DIR.
    # Backend optimisation off: the train step compiles ~1.5x faster on CPU, and every run here
    # (the reference too) uses the same compiler settings, so "bitwise" still compares like with like.
    self.env = dict(os.environ, TFDS_DATA_DIR=str(data), JAX_COMPILATION_CACHE_DIR=cache,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PLATFORMS='cpu',
                    XLA_FLAGS='--xla_backend_optimization_level=0', PYTHONUNBUFFERED='1')
    self._processes, self._closed, self._lock = [], False, threading.Lock()

  def launch(self, workdir: Path, *flags: str) -> subprocess.Popen:
    """Starts train.py; its output goes to <workdir>.log."""
    workdir.parent.mkdir(parents=True, exist_ok=True)
    with self._lock, open(log_path(workdir), 'ab') as log:
      if self._closed:
        raise RuntimeError('the test module is over')
      p = subprocess.Popen([PYTHON, 'train.py', *BASE, f'--workdir={workdir}', *flags],
                           cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
      self._processes.append(p)
    return p

  def close(self) -> None:
    """Ends the runs still going (a background run no selected test waited for)."""
    with self._lock:
      self._closed = True
      for p in self._processes:
        if p.poll() is None:
          p.kill()
          p.wait()

  def train(self, workdir: Path, *flags: str) -> tuple[int, str]:
    """Runs train.py to the end: (exit code, output)."""
    p = self.launch(workdir, *flags)
    try:
      rc = p.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()
      raise
    return rc, log_path(workdir).read_text(errors='replace')


class Background:
  """One worker thread running jobs in order, beside the tests' own runs (so at most two train.py
  processes at once); ``result(name)`` waits for a job and returns (or raises) what it did."""

  def __init__(self, jobs):
    self._results, self._done = {}, {name: threading.Event() for name, _ in jobs}
    threading.Thread(target=self._run, args=(jobs,), daemon=True).start()

  def _run(self, jobs) -> None:
    for name, fn in jobs:
      try:
        self._results[name] = ('ok', fn())
      except BaseException as e:  # noqa: BLE001 - re-raised in the test that asks
        self._results[name] = ('error', e)
      self._done[name].set()

  def result(self, name: str):
    if not self._done[name].wait(timeout=4 * RUN_TIMEOUT):
      raise TimeoutError(name)
    kind, value = self._results[name]
    if kind == 'error':
      raise value
    return value


def log_path(workdir: Path) -> Path:
  return workdir.with_name(workdir.name + '.log')


def committed_steps(workdir: Path) -> list[int]:
  d = workdir / 'checkpoints'
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def partial_saves(workdir: Path) -> list[str]:
  d = workdir / 'checkpoints'
  return sorted(p.name for p in d.iterdir() if TMP_MARK in p.name) if d.is_dir() else []


def steps_done(workdir: Path) -> int:
  """The last step the progress bar reported (tqdm's "k/6")."""
  found = re.findall(rf'\b(\d+)/{STEPS} \[', log_path(workdir).read_text(errors='replace'))
  return max(map(int, found), default=0)


def wait_for(condition, process: subprocess.Popen, timeout: float = RUN_TIMEOUT,
             poll: float = 0.005) -> None:
  end = time.monotonic() + timeout
  while not condition():
    if process.poll() is not None:
      raise AssertionError(f'train.py ended (exit code {process.returncode}) before the moment '
                           'to kill it came')
    if time.monotonic() > end:
      process.kill()
      raise TimeoutError('the moment to kill train.py never came')
    time.sleep(poll)


def kill(process: subprocess.Popen) -> None:
  os.kill(process.pid, signal.SIGKILL)
  assert process.wait(timeout=60) == -signal.SIGKILL


# ----------------------------------------------------------------------------- reading results

def read_state(workdir: Path, step: int | None = None) -> tuple[int, dict[str, np.ndarray]]:
  """(step, {path: array}) of a checkpoint's whole train state (latest by default), as saved, read
  as numpy by the tree metadata orbax keeps with it (whatever devices wrote it)."""
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(workdir / 'checkpoints',
                             item_handlers={'state': ocp.PyTreeCheckpointHandler()},
                             options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    step = manager.latest_step() if step is None else step
    tree = manager.item_metadata(step)['state'].tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(restore_args=as_numpy)))['state']
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return step, {jax.tree_util.keystr(path, simple=True, separator='/'): leaf for path, leaf in flat}


def model_params(model) -> dict[str, np.ndarray]:
  """{path: array} of a Sam model's state, paths as in read_state's params / frozen."""
  from flax import nnx
  return {'/'.join(map(str, path)) + '/value': np.asarray(var.get_value())
          for path, var in nnx.to_flat_state(nnx.state(model))}


def params_of(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The model's variables (trainable and frozen) of a read_state dict, keyed as model_params."""
  return {k.split('/', 1)[1]: v for k, v in state.items() if k.split('/', 1)[0] in
          ('params', 'frozen')}


def assert_same_tree(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
  assert actual.keys() == expected.keys()
  for k in expected:
    np.testing.assert_array_equal(actual[k], expected[k], err_msg=k)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope='module')
def env(tmp_path_factory):
  e = Env(tmp_path_factory.mktemp('train_resume'))
  yield e
  e.close()


def write_init_checkpoint(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
  """A random vit_tiny written as sam_jax.convert writes one: (path, its parameters)."""
  from flax import nnx
  from sam_jax import sam_model_registry
  from sam_jax.checkpoints import orbax_io
  model = sam_model_registry['vit_tiny'](seed=5)
  return orbax_io.save(root / 'init', model.config, nnx.state(model)), model_params(model)


@pytest.fixture(scope='module')
def background(env):
  """The runs no test waits to start, each compiling a program of its own, one after another in a
  thread beside the tests' own runs (the reference, then the crash tests reusing its programs)."""
  r = env.root
  results = {}

  def decoder():
    path, params = results['init'] = write_init_checkpoint(r)
    return env.train(r / 'decoder', '--config.trainable=decoder', f'--config.init_checkpoint={path}')

  return Background([
      ('decoder', decoder),
      ('nan_stop', lambda: env.train(r / 'nan_stop', NAN_LR)),
      ('nan_skip', lambda: env.train(r / 'nan_skip', NAN_LR, '--config.on_nonfinite=skip')),
      ('init', lambda: results['init']),
  ])


@pytest.fixture(scope='module')
def reference(env):
  """The uninterrupted run: (workdir, its final train state)."""
  workdir = env.root / 'reference'
  rc, out = env.train(workdir)
  assert rc == 0, out[-3000:]
  assert committed_steps(workdir)[-1] == STEPS
  return workdir, read_state(workdir)[1]


# ----------------------------------------------------------------------------- tests

def test_killed_mid_step_resumes_to_the_same_parameters(env, background, reference, tmp_path):
  # (`background` before `reference`: the background runs start first, beside the reference.)
  _, ref_state = reference
  workdir = tmp_path / 'run'
  p = env.launch(workdir)
  # A checkpoint is committed and the run is past it, inside a later step.
  wait_for(lambda: committed_steps(workdir) and steps_done(workdir) >= 3, p)
  time.sleep(0.3)
  kill(p)
  done = committed_steps(workdir)
  assert done and done[-1] < STEPS, done
  rc, out = env.train(workdir)
  assert rc == 0, out[-3000:]
  assert re.search(rf'resumed from \S+ at step {done[-1]}\b', out), out[-3000:]
  step, state = read_state(workdir)
  assert step == STEPS
  assert_same_tree(state, ref_state)  # params, optimizer state, step, RNG: bitwise
  # summary.json's per-step metrics run on across the kill, as the uninterrupted run's
  losses = lambda w: [(h['step'], h['loss']) for h in
                      json.loads((w / 'summary.json').read_text())['history']]
  assert losses(workdir) == losses(reference[0])
  assert [s for s, _ in losses(workdir)] == list(range(1, STEPS + 1))


def test_killed_during_an_async_save_resumes_from_the_last_complete_checkpoint(
    env, reference, tmp_path):
  _, ref_state = reference
  workdir = tmp_path / 'run'
  every_step = '--config.checkpoint_every_steps=1'
  p = env.launch(workdir, every_step)
  # Orbax writes <step>.orbax-checkpoint-tmp in a background thread and renames it to <step> when
  # complete: kill as soon as one appears after the first complete checkpoint.
  wait_for(lambda: any(int(n.split('.')[0]) >= 2 for n in partial_saves(workdir)), p)
  kill(p)
  done, partial = committed_steps(workdir), partial_saves(workdir)
  assert done and done[-1] < STEPS, done
  if not partial:  # the save finished between the poll and the kill (rare): leave what a kill
    # mid-write leaves, the next step's directory half written (arrays, no metadata or markers)
    partial = [f'{done[-1] + 1}{TMP_MARK}']
    shutil.copytree(workdir / 'checkpoints' / str(done[-1]), workdir / 'checkpoints' / partial[0],
                    ignore=shutil.ignore_patterns('commit_success.txt', '_CHECKPOINT_METADATA',
                                                  '_METADATA', 'manifest.ocdbt'))
  assert int(partial[0].split('.')[0]) > done[-1]
  rc, out = env.train(workdir, every_step)
  assert rc == 0, out[-3000:]
  assert re.search(rf'resumed from \S+ at step {done[-1]}\b', out), out[-3000:]
  assert not partial_saves(workdir)  # saving that step again replaced the partial directory
  step, state = read_state(workdir)
  assert step == STEPS
  assert_same_tree(state, ref_state)


RARE_SAVES = f'--config.checkpoint_every_steps={10 * STEPS}'  # only the last step's is due


def stop_with_sigterm(env, workdir: Path, *flags: str) -> int:
  """Runs train.py (no save due before the end), sends SIGTERM after step 2 and checks that it
  saved one step before the last and exited with SIGTERM's status; returns that step."""
  p = env.launch(workdir, RARE_SAVES, *flags)
  wait_for(lambda: steps_done(workdir) >= 2, p)
  p.send_signal(signal.SIGTERM)
  assert p.wait(timeout=RUN_TIMEOUT) == 128 + signal.SIGTERM, log_path(workdir).read_text()[-3000:]
  done = committed_steps(workdir)
  assert len(done) == 1 and 2 <= done[0] < STEPS, done
  out = log_path(workdir).read_text(errors='replace')
  assert f'stopped: SIGTERM after step {done[0]} of {STEPS}' in out, out[-3000:]
  return done[0]


def test_sigterm_saves_the_step_under_way_and_resumes_to_the_same_parameters(
    env, reference, tmp_path):
  """A single host's preemption notice (SIGTERM): train.py saves the step under way, though no
  checkpoint is due, and ends with the status of that signal; the same command resumes to the
  uninterrupted run's parameters."""
  _, ref_state = reference
  workdir = tmp_path / 'run'
  saved = stop_with_sigterm(env, workdir)
  rc, out = env.train(workdir, RARE_SAVES)
  assert rc == 0, out[-3000:]
  assert re.search(rf'resumed from \S+ at step {saved}\b', out), out[-3000:]
  step, state = read_state(workdir)
  assert step == STEPS
  assert_same_tree(state, ref_state)


def test_a_preemption_notice_under_jax_distributed_saves_and_stops(env, tmp_path):
  """Under jax.distributed (one process here, its coordinator on 127.0.0.1) SIGTERM goes to JAX's
  preemption service, which names the step at which every host saves: the run saves it and stops
  with the status of SIGTERM (before, it saved and trained on until the end)."""
  from test_train_multihost import free_port
  stop_with_sigterm(env, tmp_path / 'run', f'--coordinator_address=127.0.0.1:{free_port()}',
                    '--num_processes=1', '--process_id=0')


def test_a_second_signal_stops_at_once():
  """The first SIGINT (Ctrl-C) is only noted, for the loop to save and stop; the second one raises
  KeyboardInterrupt as Python's own handler does; the handler is put back afterwards."""
  from sam_jax.training.checkpointing import StopSignals
  before = signal.getsignal(signal.SIGINT)
  stop = StopSignals((signal.SIGINT,))
  try:
    signal.raise_signal(signal.SIGINT)
    assert stop.received == 'SIGINT'
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)
  finally:
    stop.restore()
  assert signal.getsignal(signal.SIGINT) is before


def test_nonfinite_loss_stops_with_exit_code_3_keeping_a_finite_checkpoint(env, background):
  rc, out = background.result('nan_stop')
  assert rc == 3, out[-3000:]
  m = re.search(r'error: non-finite loss .*, gradient norm .* or updated parameters .* at step (\d+)',
                out)
  assert m, out[-3000:]
  bad_step = int(m.group(1))
  workdir = env.root / 'nan_stop'
  step, state = read_state(workdir)
  assert 1 <= step < bad_step, (step, bad_step)
  assert step == committed_steps(workdir)[-1]
  for k, v in params_of(state).items():
    assert np.isfinite(v).all(), k
  assert any(np.abs(v).max() > 1e20 for v in params_of(state).values())  # lr 1e30 did act


def test_nonfinite_loss_skipped_keeps_finite_parameters(env, background):
  rc, out = background.result('nan_skip')
  assert rc == 0, out[-3000:]
  assert 'non-finite loss, update skipped' in out
  step, state = read_state(env.root / 'nan_skip')
  assert step == STEPS
  for k, v in state.items():
    if not k.startswith('rng'):
      assert np.isfinite(v).all(), k


def test_decoder_only_training_leaves_the_encoder_and_has_no_encoder_optimizer_state(
    env, background):
  from sam_jax import sam_model_registry
  rc, out = background.result('decoder')
  assert rc == 0, out[-3000:]
  assert 'initial weights from' in out
  _, initial = background.result('init')
  workdir = env.root / 'decoder'
  step, state = read_state(workdir)
  assert step == STEPS
  final = model_params(sam_model_registry['vit_tiny'](checkpoint=workdir))
  assert_same_tree(params_of(state), final)
  encoder = [k for k in initial if k.startswith('image_encoder/')]
  assert encoder and all(f'frozen/{k}' in state for k in encoder)  # not among the trained params
  for k in encoder:
    np.testing.assert_array_equal(final[k], initial[k], err_msg=k)
  decoder = [k for k in initial if k.startswith('mask_decoder/')]
  assert sum(not np.array_equal(final[k], initial[k]) for k in decoder) > len(decoder) // 2
  opt = [k for k in state if k.startswith('opt_state/')]
  assert any('mask_decoder' in k for k in opt)
  assert not any('image_encoder' in k for k in opt), [k for k in opt if 'image_encoder' in k][:5]


def test_training_workdir_loads_in_the_inference_api(reference):
  from sam_jax import SamPredictor, sam_model_registry
  workdir, ref_state = reference
  model = sam_model_registry['vit_tiny'](checkpoint=workdir)
  assert_same_tree(model_params(model), params_of(ref_state))
  from sam_jax.training.checkpointing import load_model  # the notebook path (also gs://)
  assert_same_tree(model_params(load_model(str(workdir))), params_of(ref_state))
  predictor = SamPredictor(model)
  predictor.set_image(np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8))
  masks, iou, low = predictor.predict(point_coords=np.array([[50.0, 60.0]]),
                                      point_labels=np.array([1]))
  assert masks.shape == (3, 120, 200) and masks.dtype == bool
  assert iou.shape == (3,) and np.isfinite(iou).all() and np.isfinite(low).all()


def test_metrics_reach_tensorboard(reference):
  """Every scalar of summary.json's history is in the TensorBoard event files at its step, and so
  is the held-out mIoU, as TensorBoard's own reader reads them."""
  from tensorboard.backend.event_processing import event_accumulator
  workdir, _ = reference
  summary = json.loads((workdir / 'summary.json').read_text())
  events = event_accumulator.EventAccumulator(str(workdir / 'tensorboard'),
                                              size_guidance={event_accumulator.SCALARS: 0})
  events.Reload()
  logged = {tag: {e.step: e.value for e in events.Scalars(tag)}
            for tag in events.Tags()['scalars']}
  assert [h['step'] for h in summary['history']] == list(range(1, STEPS + 1))
  for h in summary['history']:  # (rounded to 5 decimals there, float32 here)
    for k, v in h.items():
      if k != 'step':
        assert logged[k][h['step']] == pytest.approx(v, rel=1e-6, abs=1e-5), (k, h['step'])
  assert {'loss', 'grad_norm', 'learning_rate', 'images_per_s', 'mfu',
          'round_00/iou_confident'} <= logged.keys()
  assert logged['eval/miou_1_points'][STEPS] == pytest.approx(summary['eval']['miou'][0],
                                                              abs=1e-4)


def test_a_finished_run_is_evaluated_again_without_training(env, reference):
  """train.py on a workdir holding a finished run (``make demo`` run twice) says so, compiles no
  train step, leaves the checkpoint as it was, and keeps the logged history in summary.json."""
  workdir, ref_state = reference
  before = json.loads((workdir / 'summary.json').read_text())
  seen = len(log_path(workdir).read_text(errors='replace'))  # the log is appended to
  rc, out = env.train(workdir)
  out = out[seen:]
  assert rc == 0, out[-3000:]
  assert f'holds a finished run (step {STEPS} of num_steps={STEPS})' in out, out[-3000:]
  assert 'compiled the train step' not in out
  assert committed_steps(workdir)[-1] == STEPS
  assert_same_tree(read_state(workdir)[1], ref_state)
  after = json.loads((workdir / 'summary.json').read_text())
  assert len(after['history']) == STEPS and after['history'] == before['history']
  assert after['eval'] == before['eval']
