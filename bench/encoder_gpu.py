"""Accelerator benchmark: our image encoder (each attention form, f32 / bf16, fwd + bwd per remat
policy) against the official PyTorch SAM in the same run, plus predict and the mask generator.

  python bench/encoder_gpu.py [--model vit_h] [--budget 270] [--out bench/results/encoder_gpu.json]
  python bench/encoder_gpu.py --smoke   # CPU, vit_tiny at 256 px, ~1-2 min: checks the script and
                                        # the analytic FLOP count against XLA's cost analysis

Runs on whatever jax finds (GPU, TPU, CPU); the official model runs on CUDA when torch has it. In
one run, best of --repeats after a warm-up call, ``time.perf_counter`` around ``block_until_ready``
(torch: ``cuda.synchronize``):
  1. official encoder: eager f32, bf16 autocast, ``torch.compile`` bf16 (skipped with the reason if
     it fails) at batch 1 and 8; the official predictor's ``predict`` (1 point);
  2. ours, inference: f32 and bf16 (parameters cast once), every attention form, batch 1 and 8;
  3. ours, fwd + bwd (loss: mean of the embedding) at batch 1 and 4 for each remat policy of
     ``image_encoder.REMAT_POLICIES``, bf16 with the attention 'auto' picks;
  4. our ``SamPredictor.predict`` (1 point, multimask) and ``SamAutomaticMaskGenerator.generate``
     (vit_b, 32x32 points, 1200x1800) in two fresh processes sharing a new compilation cache
     folder (the first compiles: cold; the second reads the cache: warm), first and second call.
Each case prints ms per image, TFLOP/s from the analytic count (``encoder_flops``: the model's
matmuls, windows padded as the model pads them; fwd + bwd counted as 3x forward, recomputation
not counted), the fraction of the chip's bf16 peak where known, XLA's temporaries
(``compiled.memory_analysis()``) and the process's peak device memory so far (jax:
``memory_stats()['peak_bytes_in_use']``, which never resets; torch: ``max_memory_allocated`` per
case). Cases past --budget seconds are skipped and say so, so a run fits a short device lease.
Writes every number as JSON to --out.

Needs only the project's extras: ``segment_anything`` (the test extra; the official rows are skipped
without it) and torch (a CUDA build on a GPU machine); a missing torchvision is stood in for by
``tests/torchvision_shim.py``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # torch shares the card
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'tests'))

IMAGE_HW = (1200, 1800)
BF16_PEAK = {'H100': 989e12, 'H200': 989e12, 'H800': 989e12, 'A100': 312e12, 'L4': 121e12,
             'TPU v5p': 459e12, 'TPU v5 lite': 197e12, 'TPU v6': 918e12, 'TPU v4': 275e12}
START = time.perf_counter()


def random_images(batch: int, size: int, seed: int = 0):
  """(B, S, S, 3) float32 like normalised images; the official model gets them as NCHW."""
  import numpy as np
  return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def log(msg: str) -> None:
  print(f'[{time.perf_counter() - START:6.1f}s] {msg}', file=sys.stderr, flush=True)


# --- analytic FLOPs ------------------------------------------------------------------------------


def block_flops(cfg, window_size: int) -> dict:
  """Forward FLOPs (2 per multiply-add) of one encoder block on one image, by part.

  A windowed block runs qkv, attention and proj on the zero-padded windows (64 -> 70 tokens a side
  for the official 14-token windows) and the MLP on the unpadded tokens, as the model does.
  """
  g, c = cfg.grid_size, cfg.encoder_embed_dim
  if window_size:
    side = math.ceil(g / window_size) * window_size
    seqs, length, rel = (side // window_size)**2, window_size**2, 2 * window_size
  else:
    seqs, length, rel = 1, g * g, 2 * g
  tokens = seqs * length
  return dict(
      qkv_proj=2 * tokens * c * 4 * c,
      attention=2 * seqs * length * length * c * 2,  # q.k and attn.v over all heads
      rel_pos=2 * tokens * rel * c,  # q . Rh and q . Rw
      mlp=2 * g * g * c * int(c * cfg.mlp_ratio) * 2)


def encoder_flops(cfg) -> dict:
  """Forward FLOPs of the image encoder on one image: total and by part."""
  g, c, out, p = cfg.grid_size, cfg.encoder_embed_dim, cfg.prompt_embed_dim, cfg.patch_size
  groups, per_group = cfg.block_groups
  window, glob = block_flops(cfg, cfg.window_size), block_flops(cfg, 0)
  parts = dict(patch_embed=2 * g * g * p * p * 3 * c,
               window_blocks=groups * (per_group - 1) * sum(window.values()),
               global_blocks=groups * sum(glob.values()),
               neck=2 * g * g * (c * out + out * out * 9))
  return dict(total=sum(parts.values()), **parts)


def check_flops(cfg) -> dict:
  """Analytic FLOPs against XLA's cost analysis on this backend, per part (a whole encoder's scans
  are while loops, whose bodies XLA's cost analysis may count once) and for the whole encoder."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from sam_jax.modeling.image_encoder import Block, ImageEncoderViT
  cfg = cfg.replace(attention='bias')  # no loops inside the attention either

  def xla_flops(make, shape):
    graphdef, state = nnx.split(nnx.eval_shape(make))
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    cost = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost['flops'])

  g, c = cfg.grid_size, cfg.encoder_embed_dim
  out = {}
  for name, ws in (('window_block', cfg.window_size), ('global_block', 0)):
    out[name] = dict(analytic=sum(block_flops(cfg, ws).values()),
                     xla=xla_flops(lambda: Block(cfg, window_size=ws, rngs=nnx.Rngs(0)),
                                   (1, g, g, c)))
  s = cfg.image_size
  parts = encoder_flops(cfg)
  groups, per_group = cfg.block_groups
  once = parts['total'] - (groups - 1) * out['global_block']['analytic'] - (
      groups * (per_group - 1) - 1) * out['window_block']['analytic']
  out['encoder'] = dict(analytic=parts['total'], analytic_loops_once=once,
                        xla=xla_flops(lambda: ImageEncoderViT(cfg, rngs=nnx.Rngs(0)), (1, s, s, 3)))
  for v in out.values():
    v['xla/analytic'] = v['xla'] / v['analytic']
  out['encoder']['xla/analytic_loops_once'] = out['encoder']['xla'] / once
  return out


# --- timing helpers ------------------------------------------------------------------------------


def best_of(fn, repeats: int) -> float:
  fn()  # warm-up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


class Budget:
  """Skips cases once ``seconds`` have passed since the start."""

  def __init__(self, seconds: float):
    self.seconds = seconds

  def left(self) -> bool:
    return time.perf_counter() - START < self.seconds


def run_case(results: list, budget: Budget, info: dict, fn) -> None:
  """Runs ``fn() -> dict`` into ``results`` with ``info``; skipped past the budget, errors kept."""
  row = dict(info)
  if not budget.left():
    row['skipped'] = 'time budget'
  else:
    try:
      row.update(fn())
    except Exception as e:  # noqa: BLE001 - an out-of-memory or unsupported case is a result too
      row['error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}'
      traceback.print_exc(limit=3)
  results.append(row)
  log(format_row(row))


def jax_peak_bytes():
  import jax
  stats = jax.devices()[0].memory_stats()
  return stats.get('peak_bytes_in_use') if stats else None


# --- the official model --------------------------------------------------------------------------


def official_model(cfg, device):
  from official_reference import official_sam
  return official_sam(cfg).to(device)


def bench_official(torch_sam, cfg, args, budget, results, flops, device, outputs: dict,
                   part: str) -> None:
  """Official encoder, part 'eager': f32, bf16 autocast, and its predict; part 'compile':
  torch.compile bf16. Batch-1 outputs go to ``outputs``."""
  import torch
  s = cfg.image_size
  cuda = device.type == 'cuda'
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  encoder = torch_sam.image_encoder

  def timed(module, batch, bf16):
    x = torch.from_numpy(random_images(batch, s).transpose(0, 3, 1, 2).copy()).to(device)

    def call():
      with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        y = module(x)
      sync()
      return y

    def case():
      if cuda:
        torch.cuda.reset_peak_memory_stats()
      t = time.perf_counter()
      y = call()  # the first call (compiles under torch.compile)
      first = time.perf_counter() - t
      sec = best_of(call, args.repeats)
      if batch == 1:
        outputs[(module is encoder, bf16)] = y.float().cpu().numpy().transpose(0, 2, 3, 1)
      return dict(ms_per_image=1e3 * sec / batch, first_call_s=first,
                  tflops=flops * batch / sec / 1e12,
                  peak_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None)
    return case

  if part == 'eager':
    for batch in args.batches:
      run_case(results, budget, dict(who='official', what='eager f32', batch=batch),
               timed(encoder, batch, False))
      run_case(results, budget, dict(who='official', what='bf16 autocast', batch=batch),
               timed(encoder, batch, True))
    run_case(results, budget, dict(who='official', what='predict 1 point', batch=1),
             lambda: predict_case(official_predictor(torch_sam), args.predict_repeats, cuda))
  elif args.torch_compile:
    try:
      compiled = torch.compile(encoder, dynamic=False)
    except Exception as e:  # noqa: BLE001
      compiled = None
      log(f'torch.compile unavailable: {e}')
    for batch in args.compile_batches:
      info = dict(who='official', what='torch.compile bf16', batch=batch)
      if compiled is None:
        results.append(dict(info, skipped='torch.compile failed'))
      else:
        run_case(results, budget, info, timed(compiled, batch, True))
  else:
    results.append(dict(who='official', what='torch.compile bf16', batch=args.batches[0],
                        skipped='--no-torch-compile (default with --smoke)'))
  if cuda:
    torch.cuda.empty_cache()  # leave the card to jax


def official_predictor(torch_sam):
  from segment_anything import SamPredictor
  return SamPredictor(torch_sam)


def predict_case(predictor, repeats: int, cuda: bool = False) -> dict:
  """set_image of a 1200x1800 image, then one point, multimask: best-of predict time."""
  import numpy as np
  image = np.random.default_rng(0).integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8)
  h, w = IMAGE_HW
  point, label = np.array([[w * 0.4, h * 0.6]]), np.array([1])
  predictor.set_image(image)

  def call():
    masks, *_ = predictor.predict(point_coords=point, point_labels=label, multimask_output=True)
    return np.asarray(masks)

  if cuda:
    import torch
    with torch.inference_mode():
      sec = best_of(call, repeats)
  else:
    sec = best_of(call, repeats)
  return dict(ms_per_image=1e3 * sec)


# --- ours --------------------------------------------------------------------------------------


def ours_from_official(torch_sam, cfg):
  """Our Sam's (graphdef, state) with the official model's weights (no file in between)."""
  import jax.numpy as jnp
  from flax import nnx

  from sam_jax.checkpoints import official
  from sam_jax.modeling.sam import Sam
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Sam(cfg, rngs=nnx.Rngs(0))))
  sd = {k: v.detach().float().cpu().numpy() for k, v in torch_sam.state_dict().items()}
  flat = official.check_and_convert(sd, cfg, state)
  for path, var in nnx.to_flat_state(state):
    var.set_value(jnp.asarray(flat[path]))
  return graphdef, state


def cast_floats(state, dtype):
  import jax
  import jax.numpy as jnp
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                      state)


def encoder_graphdef(cfg):
  from flax import nnx

  from sam_jax.modeling.image_encoder import ImageEncoderViT
  return nnx.split(nnx.eval_shape(lambda: ImageEncoderViT(cfg, rngs=nnx.Rngs(0))))[0]


def compiled_case(jitted, args_fn, batch, flops, repeats, post=None) -> dict:
  """Compiles ``jitted`` for ``args_fn()``, then times it (best of, after a warm-up)."""
  import jax
  args = args_fn()
  t = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  out = {}

  def call():
    out['y'] = jax.block_until_ready(compiled(*args))

  sec = best_of(call, repeats)
  row = dict(ms_per_image=1e3 * sec / batch, tflops=flops * batch / sec / 1e12, compile_s=compile_s,
             xla_temp_mb=mem.temp_size_in_bytes / 2**20 if mem else None,
             peak_mb=(jax_peak_bytes() or 0) / 2**20 or None)
  if post:
    row.update(post(out['y']))
  return row


def forms_for(platform: str, dtype: str) -> list[str]:
  """Every attention form worth timing here ('auto' resolves to one of them, printed apart)."""
  if platform == 'gpu' and dtype == 'bfloat16':
    return ['chunked', 'folded', 'bias', 'folded_xla', 'bias_xla']
  return ['chunked', 'folded_xla', 'bias_xla']


def bench_ours(cfg, encoder_state, args, budget, results, flops, official_out, platform, dtype):
  """Our encoder, inference in ``dtype``, every attention form, batch 1 and 8."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  x_all = jax.device_put(random_images(max(args.batches), cfg.image_size))
  state = encoder_state if dtype == 'float32' else cast_floats(encoder_state, jnp.bfloat16)
  reference = official_out.get((True, False))  # official eager f32, batch 1

  def compare(y):
    if reference is None or y.shape[0] != 1:
      return {}
    y = np.asarray(y, np.float32)
    return dict(rel_err_vs_official_f32=float(np.abs(y - reference).max() /
                                              np.abs(reference).max()))

  forms = forms_for(platform, dtype)
  if dtype == 'float32' and args.f32_forms:
    forms = [f for f in args.f32_forms if f in forms]
  elif dtype == 'bfloat16' and args.forms:
    forms = [f for f in args.forms if f in forms]
  for form in forms:
    graphdef = encoder_graphdef(cfg.replace(dtype=dtype, attention=form))
    encode = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x))
    for batch in args.batches:
      run_case(results, budget, dict(who='ours', what=f'{dtype} {form}', batch=batch),
               lambda: compiled_case(encode, lambda: (state, x_all[:batch]), batch, flops,
                                     args.repeats, compare))


def bench_train(cfg, encoder_state, args, budget, results, flops):
  """Our encoder fwd + bwd, bf16, attention 'auto', for each remat policy at batch 1 and 4."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from sam_jax.modeling.image_encoder import REMAT_POLICIES
  graphdef = encoder_graphdef(cfg.replace(dtype='bfloat16', attention='auto'))
  x_all = jax.device_put(random_images(max(args.train_batches), cfg.image_size, seed=1))
  for remat in args.remat or REMAT_POLICIES:
    def loss(state, x, remat=remat):
      return nnx.merge(graphdef, state)(x, remat=remat).astype(jnp.float32).mean()

    step = jax.jit(jax.value_and_grad(loss))
    for batch in args.train_batches:
      run_case(results, budget, dict(who='ours', what=f'fwd+bwd bf16 remat={remat}', batch=batch),
               lambda: compiled_case(step, lambda: (encoder_state, x_all[:batch]), batch,
                                     3 * flops, args.repeats))


GENERATE_WORKER = '''
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
from sam_jax.build_sam import build_sam
name, side, h, w = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
generator = SamAutomaticMaskGenerator(build_sam(name, seed=0), points_per_side=side)
image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
ready = time.perf_counter() - t0
times = []
for _ in range(2):
  t = time.perf_counter()
  masks = len(generator.generate(image))
  times.append(time.perf_counter() - t)
print(json.dumps(dict(first_call_s=times[0], second_call_s=times[1], ms_per_image=1e3 * times[1],
                      masks=masks, process_ready_s=ready)))
'''


def bench_generator(args, budget, results):
  """SamAutomaticMaskGenerator.generate in two fresh processes that share one new compilation cache
  folder: the first compiles everything (cold cache), the second finds its programs in the cache
  (warm), as a user's second session does. Each times its first and second call."""
  import subprocess
  import tempfile
  name, side = ('vit_tiny', 8) if args.smoke else ('vit_b', 32)
  with tempfile.TemporaryDirectory() as cache:
    env = dict(os.environ, SAM_JAX_COMPILATION_CACHE=cache, PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))

    def case():
      argv = [sys.executable, '-c', GENERATE_WORKER, name, str(side), *map(str, IMAGE_HW)]
      out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
      if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'failed')
      return json.loads(out.stdout.strip().splitlines()[-1])

    for which in ('cold', 'warm'):
      info = dict(who='ours', what=f'generate {name} {side}x{side}, {which} cache', batch=1)
      run_case(results, budget, info, case)


# --- report --------------------------------------------------------------------------------------


def format_row(r: dict) -> str:
  head = f'{r["who"]:<9}{r["what"]:<34}{r["batch"]:>3}'
  if 'skipped' in r or 'error' in r:
    return f'{head}   {r.get("skipped") and "skipped: " + r["skipped"] or r["error"]}'
  fmt = lambda key, f, unit='': f'{r[key]:{f}}{unit}' if r.get(key) is not None else '-'
  mfu = f'{100 * r["mfu"]:.1f}%' if r.get('mfu') else '-'
  extra = []
  if r.get('process_ready_s') is not None:
    extra.append(f'imports + model {r["process_ready_s"]:.1f}s')
  if r.get('first_call_s') is not None:
    extra.append(f'first call {r["first_call_s"]:.1f}s')
  if r.get('second_call_s') is not None:
    extra.append(f'second call {r["second_call_s"]:.2f}s, {r.get("masks")} masks')
  if r.get('compile_s') is not None:
    extra.append(f'compile {r["compile_s"]:.1f}s')
  if r.get('rel_err_vs_official_f32') is not None:
    extra.append(f'rel err vs official f32 {r["rel_err_vs_official_f32"]:.1e}')
  return (f'{head}{fmt("ms_per_image", ".2f"):>10}{fmt("tflops", ".3g"):>9}{mfu:>7}'
          f'{fmt("xla_temp_mb", ".0f"):>10}{fmt("peak_mb", ".0f"):>10}   {", ".join(extra)}')


def print_report(r: dict) -> None:
  print(f'\nSAM {r["model"]} encoder at {r["image_size"]} px on {r["device"]} (jax {r["jax"]}, '
        f'torch {r.get("torch")}, official on {r.get("torch_device")}); best of {r["repeats"]}; '
        f'analytic forward {r["flops_per_image"] / 1e9:.4g} GFLOP / image; bf16 peak '
        f'{(r["peak_flops"] or 0) / 1e12:.0f} TFLOP/s; attention auto -> {r["auto_attention"]}')
  print(f'{"who":<9}{"what":<34}{"b":>3}{"ms/img":>10}{"TFLOP/s":>9}{"MFU":>7}{"XLA tmp":>10}'
        f'{"peak MB":>10}')
  print('-' * 110)
  for row in sorted(r['cases'], key=lambda row: row['who'] != 'official'):  # stable
    print(format_row(row))
  if r.get('official_skipped'):
    print(f'official model skipped: {r["official_skipped"]}')
  if r.get('flop_check'):
    print('\nFLOP count check (forward, 1 image, attention=bias): analytic vs XLA cost analysis '
          '(XLA also counts elementwise work: softmax, GELU, LayerNorm, adds)')
    for name, v in r['flop_check'].items():
      print(f'  {name:<14} analytic {v["analytic"]:.4e}  XLA {v["xla"]:.4e}  '
            f'XLA/analytic {v["xla/analytic"]:.3f}')
    v = r['flop_check']['encoder']
    print(f'  (the encoder\'s blocks run in scans, while loops whose body XLA counts once: '
          f'analytic '
          f'with each scan body once {v["analytic_loops_once"]:.4e}, XLA/that '
          f'{v["xla/analytic_loops_once"]:.3f})')
  print(f'\ntotal {r["wall_s"]:.0f} s')


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--model', default=None, help='vit_h (default); vit_tiny with --smoke')
  ap.add_argument('--smoke', action='store_true', help='CPU check: vit_tiny, small batches')
  ap.add_argument('--repeats', type=int, default=None)
  ap.add_argument('--predict-repeats', type=int, default=20)
  ap.add_argument('--budget', type=float, default=270.0, help='seconds; later cases are skipped')
  ap.add_argument('--torch-compile', action=argparse.BooleanOptionalAction, default=None,
                  help='time torch.compile (default: on, off with --smoke)')
  ap.add_argument('--sections', default='official,ours,train,predict,generate,flops')
  ap.add_argument('--batches', default=None, help='inference batch sizes (default 1,8)')
  ap.add_argument('--compile-batches', default=None,
                  help='batch sizes for torch.compile (default: --batches)')
  ap.add_argument('--train-batches', default=None, help='fwd + bwd batch sizes (default 1,4)')
  ap.add_argument('--forms', default=None, help='bf16 attention forms (default: all here)')
  ap.add_argument('--f32-forms', default=None, help='f32 attention forms (default: all here)')
  ap.add_argument('--remat', default=None, help='remat policies (default: all)')
  ap.add_argument('--out', default=os.path.join(REPO, 'bench', 'results', 'encoder_gpu.json'))
  args = ap.parse_args()
  args.model = args.model or ('vit_tiny' if args.smoke else 'vit_h')
  args.repeats = args.repeats or (2 if args.smoke else 5)
  ints = lambda v, default: tuple(int(b) for b in v.split(',')) if v else default
  names = lambda v: v.split(',') if v else None
  args.batches = ints(args.batches, (1, 2) if args.smoke else (1, 8))
  args.compile_batches = ints(args.compile_batches, args.batches)
  args.train_batches = ints(args.train_batches, (2,) if args.smoke else (1, 4))
  args.forms, args.f32_forms, args.remat = map(names, (args.forms, args.f32_forms, args.remat))
  args.torch_compile = (not args.smoke) if args.torch_compile is None else args.torch_compile
  sections = set(args.sections.split(','))

  import jax
  import jax.numpy as jnp

  from sam_jax.modeling import attention
  from sam_jax.modeling.config import VARIANTS
  cfg = VARIANTS[args.model]
  device = jax.devices()[0]
  platform = jax.default_backend()
  flops = encoder_flops(cfg)
  kind = device.device_kind
  peak = next((v for k, v in BF16_PEAK.items() if k.lower() in kind.lower()), None)
  d = cfg.encoder_embed_dim // cfg.encoder_num_heads
  auto = {f'{name} block': attention.choose('auto', dtype=jnp.bfloat16, d=d, grid=grid)
          for name, grid in (('window', (cfg.window_size,) * 2), ('global', (cfg.grid_size,) * 2))}
  r = dict(model=args.model, image_size=cfg.image_size, device=f'{platform}: {kind}',
           jax=jax.__version__, repeats=args.repeats, flops_per_image=flops['total'],
           flops_by_part=flops, peak_flops=peak, auto_attention=str(auto), cases=[])
  budget = Budget(args.budget)
  log(f'{args.model} on {r["device"]}; attention auto (bf16) -> {auto}')

  torch_sam, official_out = None, {}
  try:
    import torch
    import torchvision_shim
    torchvision_shim.install()
    import segment_anything  # noqa: F401
    torch_device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    r.update(torch=torch.__version__, torch_device=str(torch_device))
    if platform != 'cpu' and torch_device.type == 'cpu':
      raise RuntimeError('torch has no CUDA here; the official model would run on the CPU')
    torch.manual_seed(0)
    log('building the official model (random weights)')
    torch_sam = official_model(cfg, torch_device)
  except Exception as e:  # noqa: BLE001
    r['official_skipped'] = f'{type(e).__name__}: {e}'
    log(f'official model skipped: {r["official_skipped"]}')

  from flax import nnx

  from sam_jax.build_sam import build_sam
  if torch_sam is not None:
    graphdef, state = ours_from_official(torch_sam, cfg)
  else:
    graphdef, state = nnx.split(build_sam(cfg, seed=0))
  official = torch_sam is not None and 'official' in sections
  encoder_state = nnx.state(nnx.merge(graphdef, state).image_encoder)
  # Most telling first, so that the cases a short --budget drops are the least needed ones.
  if official:
    log('1. official encoder, eager and autocast')
    bench_official(torch_sam, cfg, args, budget, r['cases'], flops['total'], torch_device,
                   official_out, 'eager')
  if 'ours' in sections:
    log('2. our encoder, inference, bf16')
    bench_ours(cfg, encoder_state, args, budget, r['cases'], flops['total'], official_out,
               platform, 'bfloat16')
  if 'train' in sections:
    log('3. our encoder, fwd + bwd')
    bench_train(cfg, encoder_state, args, budget, r['cases'], flops['total'])
  if 'generate' in sections:
    log('4. generator, fresh processes')
    bench_generator(args, budget, r['cases'])
  if official:
    log('1. official encoder, torch.compile')
    bench_official(torch_sam, cfg, args, budget, r['cases'], flops['total'], torch_device,
                   official_out, 'compile')
  if 'ours' in sections:
    log('2. our encoder, inference, f32')
    bench_ours(cfg, encoder_state, args, budget, r['cases'], flops['total'], official_out,
               platform, 'float32')
  if 'predict' in sections:
    log('4. predict')
    from sam_jax.predictor import SamPredictor
    run_case(r['cases'], budget, dict(who='ours', what='predict 1 point (f32, auto)', batch=1),
             lambda: predict_case(SamPredictor(nnx.merge(graphdef, state)), args.predict_repeats))
  if 'flops' in sections and (args.smoke or budget.left()):
    log('5. FLOP count check')
    r['flop_check'] = check_flops(cfg)
  for row in r['cases']:
    if peak and row.get('tflops') and 'f32' not in row['what'] and 'float32' not in row['what']:
      row['mfu'] = row['tflops'] * 1e12 / peak
  r['wall_s'] = time.perf_counter() - START
  print_report(r)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(r, f, indent=1, default=str)
  print(f'results written to {args.out}')


if __name__ == '__main__':
  main()
