"""CPU benchmark: our automatic mask generator against the official one, same random weights.

  .venv/bin/python bench/amg_cpu.py [--model vit_b] [--threads 2] [--repeats 2] [--size 1200x1800]
                                    [--points-per-side 32] [--out bench/results/amg_cpu.json]

One photograph (scikit-image's coffee, resized to --size; "native" keeps 400x600), ``generate()``
end to end (set_image included) at the official defaults (32x32 points, batches of 64, IoU 0.88,
stability 0.95, box NMS 0.7, no crops), timed in turns, best of --repeats; ours after a warm-up call
whose trace / lower / compile time (from jax.monitoring events) is reported apart. Fully random decoder weights give one
whole-image mask; the official model is edited as in ``tests/amg_reference.coherent_masks`` (region
masks, predicted IoUs around 0.88) so the filters and NMS see a realistic load. Then one more call
of ours, instrumented (each stage waits for its device work), gives the per-stage breakdown. The
peak RSS growth of each call (VmHWM reset before it) is reported too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'bench'))
sys.path.insert(0, os.path.join(REPO, 'tests'))

from encoder_cpu import (best_of_alternating, proc_status_mb, reset_peak_rss,  # noqa: E402
                         restrict_threads)

GOAL = 0.5
COMPILE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
                  '/jax/core/compile/jaxpr_to_mlir_module_duration',
                  '/jax/core/compile/backend_compile_duration')  # trace, lower, XLA compile
COHERENT = dict(logit_scale=3000.0, logit_offset=-300.0, iou_shift=0.84)  # for vit_b


def photograph(size: str):
  """scikit-image's coffee (400x600 RGB), resized (PIL bicubic) to HxW unless "native"."""
  import numpy as np
  import skimage.data
  from PIL import Image
  image = skimage.data.coffee()
  if size == 'native':
    return image
  h, w = map(int, size.split('x'))
  return np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))


def build_models(name: str, tmp: str):
  """The edited official Sam, and ours loaded from its .pth."""
  from amg_reference import coherent_masks
  from official_reference import official_sam, save_pth

  from sam_jax.build_sam import sam_model_registry
  from sam_jax.modeling.config import VARIANTS
  torch_sam = coherent_masks(official_sam(VARIANTS[name]), **COHERENT)
  ours = sam_model_registry[name](checkpoint=save_pth(torch_sam, os.path.join(tmp, f'{name}.pth')))
  return torch_sam, ours


def compare(ours: list, theirs: list) -> dict:
  """Counts, and per mask of ours the best-matching official mask: worst mask IoU, score diffs."""
  import numpy as np
  out = dict(ours_masks=len(ours), official_masks=len(theirs))
  if not ours or not theirs:
    return out
  a = np.stack([r['segmentation'].reshape(-1) for r in ours]).astype(np.float32)
  b = np.stack([r['segmentation'].reshape(-1) for r in theirs]).astype(np.float32)
  inter = a @ b.T
  iou = inter / (a.sum(1)[:, None] + b.sum(1)[None] - inter)
  best = iou.argmax(1)
  return dict(out, worst_mask_iou=float(iou.max(1).min()),
              one_to_one=len(set(best.tolist())) == len(ours),
              max_predicted_iou_diff=max(abs(ours[i]['predicted_iou'] - theirs[j]['predicted_iou'])
                                         for i, j in enumerate(best)),
              max_stability_diff=max(abs(ours[i]['stability_score'] - theirs[j]['stability_score'])
                                     for i, j in enumerate(best)))


def timed(fn, stage: str, stages: dict, wait: bool = True):
  """``fn`` that adds its wall time (device work included when ``wait``) to ``stages[stage]``."""
  import jax

  def run(*args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    if wait:
      jax.block_until_ready(out)
    stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - t
    return out

  return run


def breakdown(generator, image) -> dict:
  """One instrumented ``generate``: seconds per stage (the rest is host postprocessing)."""
  import jax

  from sam_jax import automatic_mask_generator as amg
  stages: dict[str, float] = {}
  p = generator.predictor
  set_images = p.set_images

  def set_images_and_wait(*args, **kwargs):
    set_images(*args, **kwargs)
    jax.block_until_ready(p.features)

  p.set_images = timed(set_images_and_wait, 'encoder (set_images)', stages)
  generator.programs = generator.programs._replace(
      score=timed(generator.programs.score, 'decode batches + stats (jit)', stages),
      masks=timed(generator.programs.masks, 'kept masks to full res (jit)', stages))
  patched = {'survivors': 'filtering (gather kept, to host)', 'run_nms': 'NMS (jit)'}
  originals = {name: getattr(amg, name) for name in patched}
  for name, stage in patched.items():
    setattr(amg, name, timed(originals[name], stage, stages))
  try:
    t = time.perf_counter()
    generator.generate(image)
    total = time.perf_counter() - t
  finally:
    for name, fn in originals.items():
      setattr(amg, name, fn)
    del p.set_images
  stages['host postprocessing (RLE, records)'] = total - sum(stages.values())
  stages['total (instrumented)'] = total
  return stages


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--model', default='vit_b')
  ap.add_argument('--threads', type=int, default=2)
  ap.add_argument('--repeats', type=int, default=2)
  ap.add_argument('--size', default='1200x1800', help='HxW of the photograph, or "native"')
  ap.add_argument('--points-per-side', type=int, default=32)
  ap.add_argument('--out', default=os.path.join(REPO, 'bench', 'results', 'amg_cpu.json'))
  args = ap.parse_args()

  threads_note = restrict_threads(args.threads)
  import torch
  torch.set_num_threads(args.threads)
  import torchvision_shim
  torchvision_shim.install()
  import jax
  import jax.monitoring
  from segment_anything import SamAutomaticMaskGenerator as TorchGenerator

  from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator

  def log(msg):
    print(f'[{time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)

  image = photograph(args.size)
  settings = dict(points_per_side=args.points_per_side)
  with tempfile.TemporaryDirectory() as tmp:
    log(f'building {args.model} (official random weights, edited -> .pth -> ours)')
    torch_sam, ours = build_models(args.model, tmp)
  theirs_gen = TorchGenerator(torch_sam, **settings)
  ours_gen = SamAutomaticMaskGenerator(ours, **settings)
  log('ours: warm-up (compiles)')
  compiles = []  # seconds of each trace / lower / XLA compile step of ours
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **_: compiles.append(secs) if event in COMPILE_EVENTS else None)
  t = time.perf_counter()
  ours_gen.generate(image)
  warmup_s = time.perf_counter() - t
  compile_s, n_compile_steps = sum(compiles), len(compiles)
  log('timed runs, alternating')
  results, peak_mb = {}, {'torch': 0.0, 'jax': 0.0}

  def run(name, gen):  # also the peak RSS growth of the call (VmHWM reset before it)
    reset_peak_rss()
    base = proc_status_mb('VmRSS')
    results[name] = gen.generate(image)
    peak_mb[name] = max(peak_mb[name], proc_status_mb('VmHWM') - base)

  timing = best_of_alternating(lambda: run('torch', theirs_gen), lambda: run('jax', ours_gen),
                               args.repeats)
  recompiles = len(compiles) - n_compile_steps
  log('ours: instrumented run')
  stages = breakdown(ours_gen, image)
  report = dict(model=args.model, threads=args.threads, threads_note=threads_note,
                repeats=args.repeats, image_hw=list(image.shape[:2]), settings=settings,
                coherent_masks=COHERENT, jax=jax.__version__, torch=torch.__version__,
                cpus=os.cpu_count(), generate=dict(**timing, goal=GOAL),
                jax_warmup_s=warmup_s, jax_compile_s=compile_s,
                jax_compile_steps_in_timed_runs=recompiles,
                peak_rss_growth_mb=peak_mb, jax_breakdown_s=stages, parity=compare(results['jax'], results['torch']))
  print_table(report)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(report, f, indent=2)
  print(f'\nresults written to {args.out}')


def print_table(r: dict) -> None:
  g, par = r['generate'], r['parity']
  hw = 'x'.join(map(str, r['image_hw']))
  print(f'\nSAM {r["model"]} automatic masks on CPU, {r["threads"]} threads ({r["threads_note"]}); '
        f'best of {r["repeats"]}')
  print(f'{"measurement":<48}{"torch":>10}{"ours":>10}{"ours/torch":>12}   goal')
  print('-' * 92)
  ratio = g['jax_s'] / g['torch_s']
  verdict = 'met' if ratio <= g['goal'] else 'NOT met'
  print(f'{"generate() " + hw + ", " + str(r["settings"]["points_per_side"]) + "^2 points":<48}'
        f'{g["torch_s"]:>9.2f}s{g["jax_s"]:>9.2f}s{ratio:>11.2f}x   <= {g["goal"]}x ({verdict})')
  print(f'ours: first call {r["jax_warmup_s"]:.2f}s, of which trace + lower + XLA compile '
        f'{r["jax_compile_s"]:.2f}s (compile steps in the timed runs: '
        f'{r["jax_compile_steps_in_timed_runs"]}); '
        f'runs (s): torch {[round(t, 2) for t in g["torch_times"]]}, ours '
        f'{[round(t, 2) for t in g["jax_times"]]}')
  m = r['peak_rss_growth_mb']
  print(f'peak RSS growth during a call: torch {m["torch"]:.0f} MB, ours {m["jax"]:.0f} MB')
  print(f'masks: ours {par["ours_masks"]}, official {par["official_masks"]}' + (
      f'; matched one to one: {par["one_to_one"]}, worst mask IoU {par["worst_mask_iou"]:.4f}, '
      f'max |d predicted_iou| {par["max_predicted_iou_diff"]:.1e}, max |d stability| '
      f'{par["max_stability_diff"]:.1e}' if 'worst_mask_iou' in par else ''))
  print('ours by stage (instrumented run, each stage waits for its device work):')
  for stage, s in r['jax_breakdown_s'].items():
    print(f'  {stage:<44}{s:>8.2f}s')


if __name__ == '__main__':
  main()
