"""CPU benchmark: our JAX SAM against the official PyTorch SAM, same random weights, same threads.

  .venv/bin/python bench/encoder_cpu.py [--model vit_b] [--threads 2] [--repeats 3]
                                        [--skip-compile-depth] [--out bench/results/encoder_cpu.json]

Measures, in one run:
  1. the image encoder at SxS float32, batch 1: torch ``model.image_encoder(x)`` under no_grad vs our
     jitted ``programs(graphdef).encode`` (compile timed separately); best of --repeats; max abs diff of outputs;
  2. ``SamPredictor.set_image`` (non-square 1200x1800 image) and one ``predict`` call (one point,
     multimask) for both predictors; best of repeats;
  3. peak RSS of the encoder, each framework in a fresh subprocess (``--worker torch|jax``): the
     growth of the peak (VmHWM) over the RSS after imports + weight loading, with our compile's
     own peak reported apart (the peak is reset between compiling and running);
  4. trace + XLA compile time of the encoder for vit_b / vit_l / vit_h from abstract (eval_shape)
     weights, to show compile time does not grow with depth.
Prints a table with the goals and writes all numbers as JSON to --out.

Threads: torch uses ``torch.set_num_threads(N)``. XLA:CPU has no flag for its thread count in jax
0.10.2 (``intra_op_parallelism_threads`` is a TensorFlow option, an unknown flag to XLA); its pool is
sized from the CPUs the process may run on, so for N below the machine's core count the process is
pinned to N cores (``os.sched_setaffinity``) before jax is imported, which restricts both.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'tests'))

GOALS = {'encoder': 0.6, 'predict': 0.5, 'memory': 1.0}
IMAGE_HW = (1200, 1800)


def restrict_threads(threads: int) -> str:
  """Pins this process to ``threads`` cores (before jax / torch are imported); says what it did."""
  os.environ.setdefault('XLA_FLAGS', '--xla_cpu_multi_thread_eigen=true')
  cpus = sorted(os.sched_getaffinity(0))
  if threads < len(cpus):
    os.sched_setaffinity(0, cpus[:threads])
    return f'pinned to cores {cpus[:threads]} (XLA sizes its pool from the affinity)'
  return f'{len(cpus)} cores available; XLA uses all of them = {len(cpus)} threads'


def proc_status_mb(field: str) -> float:
  """A /proc/self/status memory field (VmRSS, VmHWM) in MB."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1]) / 1024
  raise RuntimeError(f'no {field} in /proc/self/status')


def reset_peak_rss() -> None:
  """Resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0)."""
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')


def best_of(fn, repeats: int) -> tuple[float, list[float]]:
  """Min and all wall times of ``fn()`` over ``repeats`` calls."""
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times), times


def best_of_alternating(torch_fn, jax_fn, repeats: int) -> dict:
  """Both functions timed in turns (torch, ours, torch, ...), so load from others hits both alike."""
  import torch
  times = {'torch': [], 'jax': []}
  for _ in range(repeats):
    for name, fn in (('torch', torch_fn), ('jax', jax_fn)):
      t = time.perf_counter()
      with torch.no_grad():
        fn()
      times[name].append(time.perf_counter() - t)
  torch_s, jax_s = min(times['torch']), min(times['jax'])
  return dict(torch_s=torch_s, jax_s=jax_s, ratio=jax_s / torch_s, torch_times=times['torch'],
              jax_times=times['jax'])


def random_image(seed: int = 0):
  import numpy as np
  return np.random.default_rng(seed).integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8)


def random_encoder_input(size: int, seed: int = 0):
  """(1, S, S, 3) float32, like a normalised image."""
  import numpy as np
  return np.random.default_rng(seed).standard_normal((1, size, size, 3)).astype(np.float32)


# --- building the two models -------------------------------------------------------------------


def build_models(name: str, tmp: str):
  """Official torch Sam (random weights), its .pth, our Sam loaded from it, and an .npz of ours."""
  import numpy as np
  from flax import nnx
  from official_reference import official_sam, save_pth

  from sam_jax.build_sam import sam_model_registry
  from sam_jax.modeling.config import VARIANTS
  torch_sam = official_sam(VARIANTS[name])
  pth = save_pth(torch_sam, os.path.join(tmp, f'{name}.pth'))
  ours = sam_model_registry[name](checkpoint=pth)
  npz = os.path.join(tmp, f'{name}_ours.npz')
  flat = nnx.to_flat_state(nnx.state(ours))
  np.savez(npz, **{'/'.join(map(str, p)): np.asarray(v.get_value()) for p, v in flat})
  return torch_sam, ours, pth, npz


def load_ours_npz(name: str, npz: str):
  """Our Sam from the .npz written by ``build_models`` (no torch needed)."""
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from sam_jax.modeling.config import VARIANTS
  from sam_jax.modeling.sam import Sam
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Sam(VARIANTS[name], rngs=nnx.Rngs(0))))
  with np.load(npz) as arrays:
    for p, var in nnx.to_flat_state(state):
      var.set_value(jnp.asarray(arrays['/'.join(map(str, p))]))
  return graphdef, state


# --- 1. encoder --------------------------------------------------------------------------------


def trace_and_compile(jitted, *args):
  """(compiled executable, trace seconds, XLA compile seconds); later calls reuse the executable."""
  t = time.perf_counter()
  lowered = jitted.lower(*args)
  trace_s = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  return compiled, trace_s, time.perf_counter() - t


def bench_encoder(torch_sam, ours, repeats: int) -> dict:
  """Encoder wall time (best of repeats) of both, our compile time, and the outputs' max abs diff."""
  import jax
  import numpy as np
  import torch
  from flax import nnx

  from sam_jax.predictor import programs
  size = ours.image_size
  x = random_encoder_input(size)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  graphdef, state = nnx.split(ours)
  encode = programs(graphdef).encode

  compiled, trace_s, compile_s = trace_and_compile(encode, state, x)
  temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20
  t = time.perf_counter()
  y = encode(state, x).block_until_ready()  # reuses the executable above
  first_call_s = time.perf_counter() - t
  with torch.no_grad():
    yt = torch_sam.image_encoder(xt)  # warm-up
  timing = best_of_alternating(lambda: torch_sam.image_encoder(xt),
                               lambda: encode(state, x).block_until_ready(),
                               repeats)
  diff = float(np.abs(np.asarray(y).transpose(0, 3, 1, 2) - yt.numpy()).max())
  return dict(**timing, trace_s=trace_s, compile_s=compile_s, first_call_s=first_call_s,
              xla_temp_mb=temp_mb, max_abs_diff=diff,
              output_max_abs=float(np.abs(yt.numpy()).max()), goal=GOALS['encoder'])


# --- 2. predictor --------------------------------------------------------------------------------


def bench_predictor(torch_sam, ours, repeats: int, predict_repeats: int) -> dict:
  """set_image and one-point multimask predict of both predictors (image already set)."""
  import numpy as np
  import torch
  from segment_anything import SamPredictor as TorchPredictor

  from sam_jax.predictor import SamPredictor
  image = random_image()
  h, w = IMAGE_HW
  point = np.array([[w * 0.4, h * 0.6]])
  label = np.array([1])
  theirs, mine = TorchPredictor(torch_sam), SamPredictor(ours)

  def set_mine():  # our set_image dispatches the encoder asynchronously: wait for it
    mine.set_image(image)
    mine.features.block_until_ready()

  set_mine()  # warm-up (the encoder is already compiled by bench_encoder)
  set_image = best_of_alternating(lambda: theirs.set_image(image), set_mine, repeats)

  def predict(p):
    return p.predict(point_coords=point, point_labels=label, multimask_output=True)

  t = time.perf_counter()
  out_mine = predict(mine)
  mine_first_s = time.perf_counter() - t
  with torch.no_grad():
    out_theirs = predict(theirs)
  timing = best_of_alternating(lambda: predict(theirs), lambda: predict(mine), predict_repeats)

  breakdown = predict_breakdown(mine, point, label, predict_repeats)
  torch_breakdown = torch_predict_breakdown(theirs, point, label, predict_repeats)
  return dict(
      image_hw=list(IMAGE_HW),
      set_image=set_image,
      predict=dict(**timing, jax_first_call_s=mine_first_s, goal=GOALS['predict'],
                   jax_breakdown_s=breakdown, torch_breakdown_s=torch_breakdown),
      masks_equal_fraction=float((out_mine[0] == out_theirs[0]).mean()),
      iou_max_abs_diff=float(np.abs(out_mine[1] - out_theirs[1]).max()),
      low_res_max_abs_diff=float(np.abs(out_mine[2] - out_theirs[2]).max()))


def predict_breakdown(predictor, point, label, repeats: int) -> dict:
  """Where our predict spends its time: prompt prep on the host, the jitted program (decoder +
  postprocess), device -> numpy (best of)."""
  import jax
  import numpy as np

  from sam_jax.modeling.sam import postprocess_weights
  from sam_jax.predictor import assemble_prompts
  p = predictor
  stages = {}

  def prep():
    coords = p.transform.apply_coords(np.asarray(point, np.float64), p.original_size)[None]
    c, l = assemble_prompts(coords, label.astype(np.int32)[None], None, 1)
    weights = postprocess_weights(p.model.config.low_res_size, p.model.image_size, p.input_size,
                                  p.original_size)
    return c, l, weights

  c, l, weights = prep()
  stages['prompt_prep'] = best_of(prep, repeats)[0]

  def run():
    return jax.block_until_ready(p.programs.predict(
        p.state, p.features, p.image_pe, c, l, None, weights, multimask_output=True,
        return_logits=False))

  out = run()
  stages['decode+postprocess'] = best_of(run, repeats)[0]
  stages['to_numpy'] = best_of(lambda: [np.asarray(a)[0] for a in out], repeats)[0]
  return stages


def torch_predict_breakdown(predictor, point, label, repeats: int) -> dict:
  """The official predict's stages: prompt encoder + mask decoder, postprocess_masks (best of)."""
  import torch
  p, model = predictor, predictor.model
  coords = torch.as_tensor(p.transform.apply_coords(point, p.original_size),
                           dtype=torch.float)[None]
  labels = torch.as_tensor(label, dtype=torch.int)[None]

  def run_decode():
    sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    return model.mask_decoder(image_embeddings=p.features,
                              image_pe=model.prompt_encoder.get_dense_pe(),
                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                              multimask_output=True)

  with torch.no_grad():
    low_res, _ = run_decode()
    stages = {'decode': best_of(run_decode, repeats)[0]}
    stages['upscale'] = best_of(
        lambda: model.postprocess_masks(low_res, p.input_size, p.original_size) > 0.0, repeats)[0]
  return stages


# --- 3. peak memory (subprocess workers) ---------------------------------------------------------


def worker(kind: str, name: str, weights: str, threads: int) -> dict:
  """Runs in a fresh process: load weights, run the encoder once, report memory in MB.

  Peaks are VmHWM, reset with /proc/self/clear_refs after loading: ru_maxrss would not do, as a
  child inherits its parent's peak across fork + exec (the benchmark's own process is large).
  """
  threads_note = restrict_threads(threads)
  extra = {}
  if kind == 'torch':
    import torch
    torch.set_num_threads(threads)
    import torchvision_shim
    torchvision_shim.install()
    from official_reference import official_sam

    from sam_jax.modeling.config import VARIANTS
    sam = official_sam(VARIANTS[name])
    sam.load_state_dict(torch.load(weights, map_location='cpu', weights_only=True))
    size = sam.image_encoder.img_size
    x = torch.from_numpy(random_encoder_input(size).transpose(0, 3, 1, 2).copy())
    base, load_peak = proc_status_mb('VmRSS'), proc_status_mb('VmHWM')
    reset_peak_rss()
    with torch.no_grad():
      sam.image_encoder(x)
  else:
    from sam_jax.modeling.config import VARIANTS
    from sam_jax.predictor import programs
    graphdef, state = load_ours_npz(name, weights)
    encode = programs(graphdef).encode
    x = random_encoder_input(VARIANTS[name].image_size)
    base, load_peak = proc_status_mb('VmRSS'), proc_status_mb('VmHWM')
    reset_peak_rss()
    t = time.perf_counter()
    compiled = encode.lower(state, x).compile()
    extra = dict(compile_s=time.perf_counter() - t,
                 compile_peak_growth_mb=proc_status_mb('VmHWM') - base,
                 rss_after_compile_mb=proc_status_mb('VmRSS'),
                 xla_temp_mb=compiled.memory_analysis().temp_size_in_bytes / 2**20)
    reset_peak_rss()
    encode(state, x).block_until_ready()  # reuses the executable above
  run_peak = proc_status_mb('VmHWM')
  return dict(kind=kind, threads=threads, threads_note=threads_note, rss_after_load_mb=base,
              load_peak_mb=load_peak, run_peak_mb=run_peak, peak_growth_mb=run_peak - base,
              total_peak_mb=max(load_peak, run_peak, base + extra.get('compile_peak_growth_mb', 0)),
              **extra)


def run_worker(kind: str, args, weights: str) -> dict:
  """``worker`` in a fresh interpreter (this script with --worker); its JSON result."""
  cmd = [sys.executable, os.path.abspath(__file__), '--worker', kind, '--model', args.model,
         '--threads', str(args.threads), '--weights', weights]
  out = subprocess.run(cmd, capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f'{kind} worker failed:\n{out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def bench_memory(args, pth: str, npz: str) -> dict:
  """Peak RSS growth of one encoder run, torch vs ours, each in its own process."""
  torch_r, jax_r = run_worker('torch', args, pth), run_worker('jax', args, npz)
  return dict(torch=torch_r, jax=jax_r, ratio=jax_r['peak_growth_mb'] / torch_r['peak_growth_mb'],
              ratio_total=jax_r['total_peak_mb'] / torch_r['total_peak_mb'], goal=GOALS['memory'])


# --- 4. compile time vs depth --------------------------------------------------------------------


def bench_compile_depth(names=('vit_b', 'vit_l', 'vit_h')) -> dict:
  """Trace and XLA compile time of the encoder from abstract weights (nothing materialised)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from sam_jax.modeling.config import VARIANTS
  from sam_jax.modeling.sam import Sam
  from sam_jax.predictor import programs
  out = {}
  for name in names:
    cfg = VARIANTS[name]
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Sam(cfg, rngs=nnx.Rngs(0))))
    x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    programs.cache_clear()  # a fresh jit, so nothing compiled earlier in this run is reused
    compiled, trace_s, compile_s = trace_and_compile(programs(graphdef).encode, state, x)
    out[name] = dict(depth=cfg.encoder_depth, embed_dim=cfg.encoder_embed_dim,
                     image_size=cfg.image_size, trace_s=trace_s,
                     compile_s=compile_s, total_s=trace_s + compile_s,
                     xla_temp_mb=compiled.memory_analysis().temp_size_in_bytes / 2**20)
    print(f'  compiled {name}: {trace_s + compile_s:.1f}s', file=sys.stderr, flush=True)
  return out


# --- report --------------------------------------------------------------------------------------


def verdict(ratio: float, goal: float) -> str:
  return f'goal <= {goal:.1f}x  {"MET" if ratio <= goal else "NOT MET"}'


def print_table(r: dict) -> None:
  e, p, m = r['encoder'], r['predictor'], r['memory']
  hw = 'x'.join(map(str, p['image_hw']))
  print(f'\nSAM {r["model"]} on CPU, {r["threads"]} threads ({r["threads_note"]}); '
        f'best of {r["repeats"]} (predict: best of {r["predict_repeats"]})')
  print(f'{"measurement":<44}{"torch":>11}{"ours":>11}{"ours/torch":>12}   goal')
  print('-' * 100)

  def row(label, t, j, goal=None, unit='s'):
    g = verdict(j / t, goal) if goal else ''
    fmt = (lambda v: f'{v:.3f} s') if unit == 's' else (lambda v: f'{v:.0f} MB')
    print(f'{label:<44}{fmt(t):>11}{fmt(j):>11}{j / t:>11.2f}x   {g}')

  row(f'1. image encoder {r["image_size"]}px, batch 1', e['torch_s'], e['jax_s'], GOALS['encoder'])
  row(f'2. set_image {hw} (end to end)', p['set_image']['torch_s'], p['set_image']['jax_s'])
  row('2. predict (1 point, multimask)', p['predict']['torch_s'], p['predict']['jax_s'],
      GOALS['predict'])
  row('3. encoder run: peak RSS - RSS after load', m['torch']['peak_growth_mb'],
      m['jax']['peak_growth_mb'], GOALS['memory'], unit='MB')
  print(f'{"   ... ours: run only, over RSS after compile":<44}{"":>11}'
        f'{m["jax"]["run_peak_mb"] - m["jax"]["rss_after_compile_mb"]:>8.0f} MB')
  row('   process total peak RSS (ours: incl compile)', m['torch']['total_peak_mb'],
      m['jax']['total_peak_mb'], unit='MB')
  print('-' * 100)
  print(f'encoder outputs: max abs diff {e["max_abs_diff"]:.2e} (max |output| '
        f'{e["output_max_abs"]:.2f}); ours: trace {e["trace_s"]:.1f}s + compile '
        f'{e["compile_s"]:.1f}s, first call after compile {e["first_call_s"]:.1f}s, XLA temp '
        f'buffers {e["xla_temp_mb"]:.0f} MB')
  print(f'encoder runs, alternating (s): torch {fmt_list(e["torch_times"])}  ours '
        f'{fmt_list(e["jax_times"])}')
  print(f'predict outputs: masks equal {100 * p["masks_equal_fraction"]:.4f}%, iou max abs diff '
        f'{p["iou_max_abs_diff"]:.2e}, low-res logits max abs diff {p["low_res_max_abs_diff"]:.2e}; '
        f'our first predict call (compiles) {p["predict"]["jax_first_call_s"]:.2f}s')
  b = p['predict']['jax_breakdown_s']
  print('our predict, by stage (best of): ' +
        ', '.join(f'{k} {1000 * v:.1f} ms' for k, v in b.items()))
  b = p['predict']['torch_breakdown_s']
  print('official predict, by stage (best of): ' +
        ', '.join(f'{k} {1000 * v:.1f} ms' for k, v in b.items()))
  print(f'memory (MB): RSS after imports + load: torch {m["torch"]["rss_after_load_mb"]:.0f}, ours '
        f'{m["jax"]["rss_after_load_mb"]:.0f}; ours: compile peak growth '
        f'{m["jax"]["compile_peak_growth_mb"]:.0f}, RSS after compile '
        f'{m["jax"]["rss_after_compile_mb"]:.0f}, XLA temp buffers '
        f'{m["jax"]["xla_temp_mb"]:.0f}')
  if r.get('compile_depth'):
    print('\n4. encoder trace + XLA compile time vs depth (batch 1, abstract weights)')
    print(f'{"model":<8}{"depth":>6}{"dim":>6}{"size":>6}{"trace":>9}{"compile":>10}{"total":>9}'
          f'{"XLA temp":>11}')
    for name, c in r['compile_depth'].items():
      print(f'{name:<8}{c["depth"]:>6}{c["embed_dim"]:>6}{c["image_size"]:>6}{c["trace_s"]:>8.1f}s'
            f'{c["compile_s"]:>9.1f}s{c["total_s"]:>8.1f}s{c["xla_temp_mb"]:>8.0f} MB')


def fmt_list(xs) -> str:
  return '[' + ', '.join(f'{x:.2f}' for x in xs) + ']'


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--model', default='vit_b')
  ap.add_argument('--threads', type=int, default=2)
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--predict-repeats', type=int, default=20)
  ap.add_argument('--skip-compile-depth', action='store_true')
  ap.add_argument('--out', default=os.path.join(REPO, 'bench', 'results', 'encoder_cpu.json'))
  ap.add_argument('--worker', choices=('torch', 'jax'), help=argparse.SUPPRESS)
  ap.add_argument('--weights', help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    print(json.dumps(worker(args.worker, args.model, args.weights, args.threads)))
    return

  threads_note = restrict_threads(args.threads)
  import torch
  torch.set_num_threads(args.threads)
  import torchvision_shim
  torchvision_shim.install()
  import jax

  from sam_jax.modeling.config import VARIANTS
  results = dict(model=args.model, threads=args.threads, threads_note=threads_note,
                 repeats=args.repeats, predict_repeats=args.predict_repeats,
                 image_size=VARIANTS[args.model].image_size, jax=jax.__version__,
                 torch=torch.__version__, cpus=os.cpu_count())

  def log(msg):
    print(f'[{time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)

  with tempfile.TemporaryDirectory() as tmp:
    log(f'building {args.model} (official random weights -> .pth -> ours)')
    torch_sam, ours, pth, npz = build_models(args.model, tmp)
    log('1. encoder')
    results['encoder'] = bench_encoder(torch_sam, ours, args.repeats)
    log('2. set_image / predict')
    results['predictor'] = bench_predictor(torch_sam, ours, args.repeats, args.predict_repeats)
    del torch_sam, ours
    log('3. peak memory (subprocesses)')
    results['memory'] = bench_memory(args, pth, npz)
  if not args.skip_compile_depth:
    log('4. compile time vs depth')
    results['compile_depth'] = bench_compile_depth()

  print_table(results)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(results, f, indent=2)
  print(f'\nresults written to {args.out}')


if __name__ == '__main__':
  main()
