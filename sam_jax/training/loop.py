"""``train_and_evaluate(config, workdir)``: the training run, in sections (big_vision style).

  mesh -> model shapes (abstract, nothing materialised) -> shardings -> optimizer -> state
  (resume order: the workdir's latest checkpoint, else ``config.init_checkpoint``, else scratch)
  -> input pipeline (this process's shard, resumed position) -> compile (memory logged) -> loop
  (metrics, checkpoints, preemption, non-finite stop) -> held-out evaluation.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from sam_jax import sharding
from sam_jax.data import preprocess
from sam_jax.data.config import InputConfig
from sam_jax.errors import ConfigError
from sam_jax.modeling import attention
from sam_jax.modeling.config import VARIANTS, SamConfig
from sam_jax.modeling.sam import Sam
from sam_jax.training import (checkpointing, config as train_config, losses,
                              metrics as metrics_lib, optimizer, prompt_rounds, scratch_init,
                              train_step)

log = logging.getLogger('sam_jax.train')


class NonFiniteLossError(RuntimeError):
  """The loss, the gradients or the updated parameters became NaN / inf
  (``config.on_nonfinite='stop'``)."""


class Stopped(Exception):
  """The run stopped on a signal (``checkpointing.StopSignals``) after saving its last step."""

  def __init__(self, message: str, signal_name: str):
    super().__init__(message)
    self.signal = signal_name


def model_config(config: ml_collections.ConfigDict) -> SamConfig:
  if config.model not in VARIANTS:
    raise ConfigError(f'config.model {config.model!r}: choose one of {sorted(VARIANTS)}')
  cfg = VARIANTS[config.model].replace(dtype=config.model_dtype,
                                       attention=config.get('attention', 'auto'))
  if cfg.image_size != config.data.image_size:
    raise ConfigError(f'config.data.image_size {config.data.image_size} differs from the model\'s '
                      f'input size {cfg.image_size} ({config.model})')
  return cfg


def input_config(config: ml_collections.ConfigDict, eval_split: bool = False,
                 num_processes: int | None = None) -> InputConfig:
  """This process's input settings; ``config.global_batch_size`` (if set) is divided among the
  ``num_processes`` (default: this job's) processes."""
  d = config.data.to_dict()
  if config.get('global_batch_size'):
    d['batch_size'] = per_process_batch(config.global_batch_size,
                                        num_processes or jax.process_count())
  if eval_split:
    d.update(config.eval_data.to_dict())
  return InputConfig(**d)


def per_process_batch(global_batch: int, num_processes: int) -> int:
  if global_batch % num_processes:
    raise ConfigError(f'config.global_batch_size {global_batch} is not divisible by the '
                      f'{num_processes} processes')
  return global_batch // num_processes


def open_pipeline(cfg: InputConfig):
  """This process's input pipeline; the synthetic dataset is built on first use (no download).
  (The data extra is imported here, so that ``setup`` runs without it, e.g. in benchmarks.)"""
  from sam_jax.data import pipeline
  ensure_dataset(cfg)
  return pipeline.InputPipeline(cfg)


def ensure_dataset(cfg: InputConfig) -> None:
  """Builds the synthetic dataset on first use (no download); other datasets must be built."""
  from sam_jax.data import sources
  name, sub = sources.split_name(cfg.dataset)
  if name != 'synthetic_shapes':
    return
  try:
    sources.version_dir(cfg.dataset, cfg.data_dir)
  except Exception:  # noqa: BLE001 - not built yet
    from sam_jax.data import build
    log.info('building %s in %s (first use)', cfg.dataset, cfg.data_dir or 'the default dir')
    build.build('synthetic_shapes', cfg.data_dir, config=sub or 'default')


def make_mesh(config: ml_collections.ConfigDict, devices=None):
  """The config's (data, fsdp, tensor) mesh over ``devices`` (default: all of this job's)."""
  m = config.mesh
  return sharding.make_mesh(m.data, m.fsdp, m.tensor, devices=devices)


def rules(config: ml_collections.ConfigDict) -> sharding.Rules:
  return tuple(tuple(r) for r in config.sharding_rules) + tuple(sharding.DEFAULT_RULES)


def state_shardings(abstract_state: dict[str, Any], mesh, rule_list) -> dict[str, Any]:
  """NamedShardings of the train state: parameters (and the optimizer moments, which carry the
  same variables' logical axes) by the rules, everything else replicated."""
  replicated = NamedSharding(mesh, P())

  def one(x):
    if isinstance(x, nnx.Variable):
      axes = x.get_metadata().get('out_sharding') or (None,) * len(x.shape)
      return x.replace(NamedSharding(mesh, sharding.logical_to_spec(axes, x.shape, mesh,
                                                                    rule_list)))
    return replicated

  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def global_batch_spec(cfg: InputConfig, num_processes: int | None = None
                      ) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of the global batch: every process's ``batch_size`` images."""
  return preprocess.batch_spec(cfg, cfg.batch_size * (num_processes or jax.process_count()))


def batch_sharding(mesh) -> NamedSharding:
  """The batch's leading (image) axis over data x fsdp."""
  return NamedSharding(mesh, P(('data', 'fsdp')))


def batch_shardings(spec: dict[str, jax.ShapeDtypeStruct], mesh) -> dict[str, NamedSharding]:
  return {k: batch_sharding(mesh) for k in spec}


def global_batch(batch: dict[str, np.ndarray], shardings: dict[str, NamedSharding]):
  """This process's images -> global arrays (every process passes its own slice)."""
  return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}


def create_state(config, cfg: SamConfig, tx, mesh, rule_list):
  """(abstract state, state shardings, init fn): parameters are born sharded."""
  seed = config.seed

  def init():
    model = Sam(cfg, rngs=nnx.Rngs(seed))
    scratch_init.apply(model, **config.scratch_init)
    _, params, frozen = train_step.split_model(model, config.trainable)
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'frozen': frozen,
            'opt_state': tx.init(params), 'rng': jax.random.PRNGKey(seed + 1)}

  abstract = jax.eval_shape(init)
  shardings = state_shardings(abstract, mesh, rule_list)
  return abstract, shardings, init


def load_initial_weights(path: str, cfg: SamConfig, state, shardings, config, tx):
  """Replaces the freshly initialised parameters by a checkpoint's (any form the registry
  reads), placed straight into the state's shardings; the optimizer state starts anew."""
  from sam_jax.checkpoints import load_state
  abstract_model = nnx.eval_shape(lambda: Sam(cfg, rngs=nnx.Rngs(0)))
  loaded = load_state(path, cfg, nnx.state(abstract_model))
  params, frozen = nnx.split_state(loaded, train_step.TRAINABLE[config.trainable], ...)
  params = jax.device_put(params, shardings['params'])
  frozen = jax.device_put(frozen, shardings['frozen'])
  opt_state = jax.jit(tx.init, out_shardings=shardings['opt_state'])(params)
  return dict(state, params=params, frozen=frozen, opt_state=opt_state)


def model_flops_per_step(t: 'Training') -> float:
  """Model FLOPs of one step: 3x the forward's (forward + backward; recomputation not counted).
  The encoder is counted analytically and one prompt round by XLA's cost analysis of an
  un-scanned round, times the rounds: XLA counts a ``lax.scan`` body once."""
  cfg, config = t.model_config, t.config
  b, m = t.batch_spec['mask_valid'].shape
  n, low, g = b * m, cfg.low_res_size, cfg.grid_size
  tokens = config.num_rounds + 1
  shapes = [jax.ShapeDtypeStruct(s, d) for s, d in (
      ((n, g, g, cfg.prompt_embed_dim), cfg.compute_dtype), ((n, tokens, 2), jnp.float32),
      ((n, tokens), jnp.int32), ((n, low, low), jnp.float32), ((n, low, low), jnp.bool_))]

  def one_round(params, frozen, emb, coords, labels, mask_input, targets):
    model = nnx.merge(t.graphdef, params, frozen)
    logits, iou = model.decode(emb, coords, labels, mask_input, multimask_output='all')
    allowed = prompt_rounds.allowed_outputs(labels)
    return losses.sam_loss(logits, iou, targets, allowed)['loss'].sum()

  strip = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  lowered = jax.jit(one_round).lower(strip(t.abstract_state['params']),
                                     strip(t.abstract_state['frozen']), *shapes)

  def flops(cost):
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get('flops', 0.0))

  round_flops = flops(lowered.cost_analysis()) or flops(lowered.compile().cost_analysis())
  return 3.0 * (b * metrics_lib.encoder_flops(cfg) + config.num_rounds * round_flops)


def describe_memory(compiled) -> str:
  m = compiled.memory_analysis()
  if m is None:
    return 'memory analysis unavailable'
  gb = lambda b: f'{b / 2**30:.2f} GiB'
  return (f'per device: arguments {gb(m.argument_size_in_bytes)}, outputs '
          f'{gb(m.output_size_in_bytes)}, temporaries {gb(m.temp_size_in_bytes)}, generated code '
          f'{gb(m.generated_code_size_in_bytes)}')


def evaluate(config, graphdef, state, mesh, *, desc: str = 'eval') -> dict[str, Any]:
  """Held-out mIoU after 1 .. eval_rounds clicks (one-point first prompts, each later point from
  the error region), over the evaluation split (``config.eval_data``)."""
  in_cfg = input_config(config, eval_split=True)
  pipe = open_pipeline(in_cfg)
  shardings = batch_shardings(global_batch_spec(in_cfg), mesh)
  step = jax.jit(train_step.make_eval_step(graphdef, config))
  total = None
  n = pipe.num_batches if not config.eval_max_batches else min(pipe.num_batches,
                                                               config.eval_max_batches)
  for i, batch in enumerate(tqdm(pipe, total=n, desc=desc, disable=jax.process_index() != 0)):
    if i >= n:
      break
    out = jax.device_get(step(state['params'], state['frozen'], global_batch(batch, shardings)))
    total = out if total is None else jax.tree.map(np.add, total, out)
  pipe.close()
  masks = max(float(total['masks']), 1.0)
  return {'masks': int(total['masks']),
          'miou': [round(float(v) / masks, 4) for v in total['iou_confident']],
          'miou_oracle': [round(float(v) / masks, 4) for v in total['iou_oracle']]}


@dataclasses.dataclass
class Training:
  """Everything a run (or a test) needs to step a model on a mesh, derived from shapes only."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  model_config: SamConfig
  graphdef: Any
  tx: Any
  schedule: Any
  init: Any                # () -> state, to be jitted with out_shardings=shardings
  abstract_state: Any      # ShapeDtypeStructs carrying their shardings
  shardings: Any
  batch_spec: dict[str, jax.ShapeDtypeStruct]  # the global batch, with its shardings
  batch_shardings: dict[str, NamedSharding]

  def init_state(self):
    return jax.jit(self.init, out_shardings=self.shardings)()

  def jitted_step(self):
    """train_step(state, global batch) -> (state, metrics), state donated."""
    fn = train_step.make_train_step(self.graphdef, self.config, self.tx, self.schedule,
                                    grad_shardings=self.shardings['params'],
                                    batch_sharding=batch_sharding(self.mesh))
    return jax.jit(fn, in_shardings=(self.shardings, self.batch_shardings),
                   out_shardings=(self.shardings, None), donate_argnums=0)

  def lower_step(self):
    """The jitted step lowered for the abstract state and batch: ``.compile()`` gives what a run
    executes (its memory and cost analyses), with nothing materialised."""
    return self.jitted_step().lower(self.abstract_state, self.batch_spec)


def setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None, *,
          num_processes: int | None = None) -> Training:
  """Mesh, model shapes, optimizer and shardings of ``config`` (nothing materialised).
  ``mesh`` and ``num_processes`` default to this job's; the compile-only path passes a pod's."""
  train_config.check(config)
  mesh = mesh or make_mesh(config)
  rule_list = rules(config)
  cfg = model_config(config)
  platform = mesh.devices.flat[0].platform
  if cfg.attention == 'auto' and platform != jax.default_backend():
    # 'auto' is resolved from the default backend when traced: name the mesh's form instead
    # (e.g. a TPU slice compiled from a CPU host with --compile_only)
    cfg = cfg.replace(attention=attention.ahead_of_time(platform))
  abstract_model = nnx.eval_shape(lambda: Sam(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_params, _ = train_step.split_model(abstract_model, config.trainable)
  tx, schedule = optimizer.make_optimizer(config, abstract_params, cfg)
  abstract_state, shardings, init = create_state(config, cfg, tx, mesh, rule_list)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, shardings)
  spec = global_batch_spec(input_config(config, num_processes=num_processes), num_processes)
  check_batch(spec['image'].shape[0], config, mesh)
  b_shardings = batch_shardings(spec, mesh)
  global_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_shardings[k])
                 for k, v in spec.items()}
  return Training(config, mesh, cfg, graphdef, tx, schedule, init, abstract_state, shardings,
                  global_spec, b_shardings)


def check_batch(images: int, config: ml_collections.ConfigDict, mesh) -> None:
  """Every microbatch of the global batch must split evenly over the batch axes (data x fsdp)."""
  k = config.get('microbatches', 1)
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  if k < 1 or images % k or (images // k) % shards:
    raise ConfigError(f'a global batch of {images} images in {k} microbatch(es) does not split '
                      f'over data x fsdp = {mesh.shape["data"]} x {mesh.shape["fsdp"]} devices: '
                      f'images / microbatches must be a multiple of {shards}')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                       ) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming what is there) and evaluates; returns a summary."""
  workdir = checkpointing.as_path(workdir)  # local, or gs://bucket/run
  is_main = jax.process_index() == 0
  workdir.mkdir(parents=True, exist_ok=True)
  t = setup(config)
  mesh, cfg, graphdef, shardings = t.mesh, t.model_config, t.graphdef, t.shardings
  abstract_state, b_shardings = t.abstract_state, t.batch_shardings
  if is_main:
    checkpointing.write_model_config(workdir, cfg, config.trainable)
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=1))

  # Data: this process's share of every global batch.
  pipe = open_pipeline(input_config(config))

  # State: resume, else initial weights, else scratch.
  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint_every_steps,
                                    config.keep_checkpoints, config.async_checkpointing)
  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state = ckpt.restore(latest, abstract_state)
    pipe.set_state(data_state)
    log.info('resumed from %s at step %d', workdir, latest)
  else:
    state = t.init_state()
    if config.init_checkpoint:
      state = load_initial_weights(config.init_checkpoint, cfg, state, shardings, config, t.tx)
      log.info('initial weights from %s', config.init_checkpoint)
  start = int(jax.device_get(state['step']))

  # Compile before step 1; a finished run (make demo run again) is only evaluated again.
  flops = model_flops_per_step(t)
  peak = metrics_lib.peak_flops(override_tflops=config.peak_tflops) * jax.device_count()
  if start >= config.num_steps:
    if is_main:
      log.warning('%s holds a finished run (step %d of num_steps=%d): evaluating it again; '
                  'delete the folder (or raise --config.num_steps) to train', workdir, start,
                  config.num_steps)
  else:
    t0 = time.perf_counter()
    compiled = t.lower_step().compile()
    if is_main:
      log.info('compiled the train step in %.1f s; %s; %.3g model FLOPs per step',
               time.perf_counter() - t0, describe_memory(compiled), flops)

  writer = metrics_lib.MetricWriter(workdir / 'tensorboard', active=is_main)
  bar = tqdm(total=config.num_steps, initial=start, desc='train', disable=not is_main,
             dynamic_ncols=True)
  # The metrics logged before a resume (written with every checkpoint; TensorBoard has them too).
  summary_path = workdir / 'summary.json'
  history = [h for h in (json.loads(summary_path.read_text())['history']
                         if summary_path.exists() else []) if h['step'] <= start]
  window, window_start = [], time.perf_counter()
  step = saved = start

  def save():
    nonlocal saved
    ckpt.save(step, state, pipe.get_state())
    saved = step
    if is_main:  # the history so far, for a resumed run to continue
      summary_path.write_text(json.dumps({'steps': step, 'history': history}, indent=1))

  # A preemption notice or Ctrl-C: save the step under way and stop. Under jax.distributed
  # SIGTERM goes to JAX's preemption service, which names one step for every host to stop at.
  distributed = jax.distributed.is_initialized()
  stop = checkpointing.StopSignals(() if distributed else (signal.SIGTERM, signal.SIGINT))
  try:
    while step < config.num_steps and not stop.received:
      batch = global_batch(next(pipe), b_shardings)
      state, m = compiled(state, batch)
      step += 1
      m = jax.device_get(m)  # small scalars; also paces the host to the device
      if not m['finite']:
        if config.on_nonfinite == 'stop':
          raise NonFiniteLossError(
              f'non-finite loss ({float(m["loss"])}), gradient norm ({float(m["grad_norm"])}) '
              f'or updated parameters (norm {float(m["param_norm"])}) at step {step}; the last '
              f'good checkpoint is kept in {workdir}')
        log.warning('step %d: non-finite loss, update skipped', step)
      window.append(m)
      bar.update(1)
      if step % config.log_every_steps == 0 or step == config.num_steps:
        elapsed = time.perf_counter() - window_start
        mean = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *window)
        scalars = metrics_lib.flatten_round_metrics(mean)
        images = float(np.sum([w['images'] for w in window]))
        scalars.update({'images_per_s': images / elapsed,
                        'mfu': flops * len(window) / elapsed / peak,
                        **{f'data/{k}': v for k, v in pipe.metrics().items()}})
        writer.scalars(step, scalars)
        bar.set_postfix(loss=f'{scalars["loss"]:.3f}',
                        iou=f'{scalars["round_00/iou_confident"]:.3f}')
        history.append({'step': step, **{k: round(v, 5) for k, v in scalars.items()}})
        window, window_start = [], time.perf_counter()
      if distributed and ckpt.reached_preemption(step):
        stop.received = 'SIGTERM'
      if ckpt.should_save(step, last=step == config.num_steps):
        save()
      if (config.eval_every_steps and step % config.eval_every_steps == 0
          and step < config.num_steps and not stop.received):
        result = evaluate(config, graphdef, state, mesh)
        writer.scalars(step, {f'eval/miou_{i + 1}_points': v for i, v in enumerate(result['miou'])})
    if stop.received and step > saved:
      save()
  finally:
    stop.restore()
    bar.close()
    ckpt.close()  # waits for the last save
    pipe.close()
  if stop.received:
    writer.close()
    raise Stopped(f'{stop.received} after step {step} of {config.num_steps}; its checkpoint is in '
                  f'{workdir}: the same command resumes the run', stop.received)

  result = evaluate(config, graphdef, state, mesh)
  writer.scalars(step, {f'eval/miou_{i + 1}_points': v for i, v in enumerate(result['miou'])})
  writer.close()
  summary = {'steps': step, 'eval': result, 'history': history,
             'model_flops_per_step': flops}
  if is_main:
    summary_path.write_text(json.dumps(summary, indent=1))
  return summary
