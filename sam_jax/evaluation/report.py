"""What ``eval.py`` writes: ``results.json`` (every figure and every mask's clicks), ``results.md``
(tables like the paper's) and ``miou_vs_points.png`` (mIoU against the number of clicks).

``results.json``::

  {"model": {...}, "protocols": {name: settings}, "config": {...},
   "single_point": {"<name>:<split>": {
       "records_read", "images", "masks", "usable_masks", "subsampled", "skipped": {counter: n},
       "seconds", "variants": {"center" | "random": {
           "miou": {"1": ..., ..., "9": ...}, "oracle_miou_1": ...,
           "by_area": {"small" | "medium" | "large": {"masks", "miou", "oracle_miou_1"}},
           "masks": [{"record", "image_id", "mask", "id", "first_point": [x, y],
                      "clicks": [[x, y, label], ...], "area", "iou": [...], "oracle_iou"},
                     ...]}}}
     | {"error": "..."}},
   "instances": {"<name>:<split>": {"records_read", "images", "skipped", "detections",
       "gt_masks", "gt_crowd", "results", "metrics": {AP, AP50, AP75, AP_S, AP_M, AP_L},
       "protocol", "seconds"} | {"error": "..."}},
   "proposals": {"<name>:<split>": {"records_read", "images", "skipped", "gt_masks", "gt_crowd",
       "results", "empty_masks", "proposals_per_image", "metrics": {AR@10, AR@100, AR@1000,
       AR_S@1000, AR_M@1000, AR_L@1000}, "protocol", "seconds"} | {"error": "..."}}}
"""
from __future__ import annotations

import json
import os
from typing import Any

from sam_jax.evaluation.single_point import AREA_RANGES, REPORTED_POINTS

JSON_FILE, MARKDOWN_FILE, PLOT_FILE = 'results.json', 'results.md', 'miou_vs_points.png'


def fmt(v: float | None) -> str:
  return '-' if v is None else f'{100 * v:.1f}'


def reported_points(num_points: int) -> list[int]:
  return [p for p in REPORTED_POINTS if p <= num_points] or [num_points]


def markdown(results: dict[str, Any]) -> str:
  """A section per protocol evaluated."""
  from sam_jax.evaluation import instances, proposals
  parts = []
  if 'single_point' in results:
    parts.append(single_point_markdown(results))
  if 'instances' in results:
    parts.append(instances.markdown(results['instances']))
  if 'proposals' in results:
    parts.append(proposals.markdown(results['proposals']))
  return '\n'.join(parts)


def single_point_markdown(results: dict[str, Any]) -> str:
  """Per first-click variant, a table of mIoU (%) by dataset and clicks, then what was skipped."""
  protocol = results['protocols']['single_point']
  points = reported_points(protocol['num_points'])
  lines = ['# Single point valid mask evaluation', '',
           f'Model: {results["model"]["variant"]} from '
           f'`{results["model"]["checkpoint"] or "random weights"}`. '
           'mIoU (%) of the most confident mask after N clicks (multimask output for the first '
           'click, single output after); "oracle @1": the best of the 3 first-click masks.', '']
  ok = {k: v for k, v in results['single_point'].items() if 'variants' in v}
  header = ' | '.join(f'{p} pt' for p in points) + ' | oracle @1 |'
  figures = lambda r: (' | '.join(fmt(r['miou'][str(p)]) for p in points)  # header's cells
                       + f' | {fmt(r["oracle_miou_1"])} |')
  for variant in protocol['first_points']:
    lines += [f'## First click: {variant}', '',
              f'| dataset | masks | {header}',
              '|---|---:|' + '---:|' * (len(points) + 1)]
    for name, res in ok.items():
      lines.append(f'| {name} | {res["masks"]} | {figures(res["variants"][variant])}')
    scored = [r for r in ok.values() if r['masks']]
    if len(scored) > 1:  # the mean over datasets, as the paper's SA-23 figures
      mean = lambda key: sum(key(r['variants'][variant]) for r in scored) / len(scored)
      lines.append(f'| **mean of {len(scored)}** | | ' + ' | '.join(
          fmt(mean(lambda r, p=p: r['miou'][str(p)])) for p in points)
                   + f' | {fmt(mean(lambda r: r["oracle_miou_1"]))} |')
    lines += ['', "By mask area (COCO's ranges: small under 32^2 pixels, medium under 96^2):", '',
              f'| dataset | area | masks | {header}',
              '|---|---|---:|' + '---:|' * (len(points) + 1)]
    for name, res in ok.items():
      for area, *_ in AREA_RANGES:
        r = res['variants'][variant]['by_area'][area]
        lines.append(f'| {name} | {area} | {r["masks"]} | {figures(r)}')
    lines.append('')
  lines += ['## Data', '', '| dataset | records read | images | masks (usable) | subsampled | '
            'skipped | seconds |', '|---|---:|---:|---:|:---:|---|---:|']
  for name, res in results['single_point'].items():
    if 'error' in res:
      lines.append(f'| {name} | - | - | - | - | error: {res["error"].splitlines()[0]} | - |')
      continue
    skipped = ', '.join(f'{k} {v}' for k, v in res['skipped'].items() if v and k != 'images_ok')
    lines.append(f'| {name} | {res["records_read"]} | {res["images"]} | {res["masks"]} '
                 f'({res["usable_masks"]}) | {"yes" if res["subsampled"] else "no"} | '
                 f'{skipped or "none"} | {res["seconds"]:.0f} |')
  return '\n'.join(lines) + '\n'


def plot(results: dict[str, Any], path: str) -> None:
  """mIoU against clicks, a line per dataset and first-click variant, the oracle as a star."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  n = results['protocols']['single_point']['num_points']
  fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
  styles = {'center': '-', 'random': '--'}
  for c, (name, res) in enumerate(results['single_point'].items()):
    if 'variants' not in res or not res['masks']:
      continue
    color = f'C{c % 10}'
    for variant, r in res['variants'].items():
      xs = list(range(1, n + 1))
      ax.plot(xs, [100 * r['miou'][str(p)] for p in xs], styles.get(variant, ':'), color=color,
              marker='o', markersize=3, label=f'{name} ({variant})')
      ax.plot([1], [100 * r['oracle_miou_1']], '*', color=color, markersize=9)
  ax.set_xlabel('number of points')
  ax.set_ylabel('mIoU (%)')
  ax.set_xticks(reported_points(n))
  ax.set_title(f'single point valid mask: {results["model"]["variant"]} (star: oracle)')
  ax.grid(alpha=0.3)
  if ax.lines:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write(results: dict[str, Any], workdir: str) -> None:
  """The three files, in ``workdir`` (written whole each time: call after every dataset)."""
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, JSON_FILE + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(results, f)
  os.replace(tmp, os.path.join(workdir, JSON_FILE))
  with open(os.path.join(workdir, MARKDOWN_FILE), 'w') as f:
    f.write(markdown(results))
  if 'single_point' in results:
    plot(results, os.path.join(workdir, PLOT_FILE))
