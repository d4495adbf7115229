"""``orchestrator report``: the study's answer as pictures. mIoU against data fraction per head
variant, searched values against mIoU, cost, the best trial's per-class IoU, written as Markdown
+ PNGs and attached to the sweep's parent MLflow run. Plots read the runs back from MLflow
(orchestrator/results.py): they show what MLflow holds."""
import os.path as osp

from orchestrator.errors import ConfigError
from orchestrator.keys import FRACTION_KEY
from orchestrator.tables import format_table

REPORT_DIR = 'report'
CURVE_PNG, CURVE_CSV = 'miou_vs_fraction.png', 'miou_vs_fraction.csv'
PARALLEL_PNG, CLASSES_PNG = 'parallel_coordinates.png', 'per_class_iou_best.png'
COST_PNG = 'miou_vs_cost.png'


def _short(key):
    return key.rsplit('.', 1)[-1] if key.startswith('model.') else key


def variant_label(row, keys):
    return ', '.join(f'{_short(k)}={row.get(k)}' for k in keys) or 'all trials'


def fraction_curve(results):
    """The table behind the mIoU-vs-fraction plot: per line (head variant and every other
    searched value but the noise keys) and fraction, the mean, std (population) and count of
    the final metric of the trials that completed their schedule, averaged over repeats and
    subset seeds only; ``stopped``: that point's trials the scheduler stopped early (listed
    apart, never averaged in)."""
    import numpy as np
    keys = results.line_keys()
    groups, stopped = {}, {}
    for row in results.ranked():
        point = (variant_label(row, keys), row.get(FRACTION_KEY, 1.0))
        groups.setdefault(point, [])
        if row['complete']:
            groups[point].append(row[results.metric])
        else:
            stopped[point] = stopped.get(point, 0) + 1
    return [dict(variant=v, fraction=f, mean=float(np.mean(x)) if x else None,
                 std=float(np.std(x)) if x else None, n=len(x), stopped=stopped.get((v, f), 0))
            for (v, f), x in sorted(groups.items())]


def pooled(results):
    """What each point of the curve averages over, in words."""
    noise = results.noise_keys()
    if not noise:
        return 'one trial per point: no repeats or subset seeds searched'
    words = {'seed': 'repeats (seed)', 'fewshot.seed': 'subsets (fewshot.seed)'}
    return 'mean ± std over ' + ' and '.join(words[k] for k in noise)


def stopped_rows(results):
    """The trials the scheduler stopped early, best first: shown, never averaged."""
    return [[r['trial_id'], r['name'], r[results.metric],
             f'stopped early at iteration {r["iters"]} of {r["planned"]}']
            for r in results.stopped_early()]


def reference_rows(results, curve):
    """Published points against the curve of the head variant whose trials match the
    reference's setting: (fraction, published, our mean, std, n, variant) rows, with n = 0 and
    variant '(not run)' where no matching trial finished at that fraction."""
    ref = results.references
    if not ref:
        return []
    keys = results.line_keys()
    variants = {variant_label(r, keys) for r in results.completed()
                if results.matches(r, ref['where'])}
    rows = []
    for fraction, published in sorted((float(f), v) for f, v in ref['points'].items()):
        ours = [c for c in curve if c['n'] and c['variant'] in variants
                and abs(c['fraction'] - fraction) < 1e-9]
        for c in ours or [dict(variant='(not run)', mean=None, std=None, n=0)]:
            rows.append([fraction, published, c['mean'], c['std'], c['n'], c['variant']])
    return rows


def _plot_curve(curve, metric, path, references=(), reference_label='published',
                pooled_text='mean ± std'):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curve = [c for c in curve if c['n']]  # a point whose trials all stopped early: no mean
    for variant in sorted({c['variant'] for c in curve}):
        pts = [c for c in curve if c['variant'] == variant]
        ax.errorbar([c['fraction'] for c in pts], [c['mean'] for c in pts],
                    yerr=[c['std'] for c in pts], marker='o', capsize=3, label=variant)
    drawn = sorted({(r[0], r[1], r[5]) for r in references if r[4]})
    if drawn:  # only beside a variant that ran: the published numbers belong to its setting
        ax.plot([d[0] for d in drawn], [d[1] for d in drawn], linestyle='none', marker='*',
                markersize=12, color='black',
                label=f'{reference_label} ({", ".join(sorted({d[2] for d in drawn}))})')
    fractions = sorted({c['fraction'] for c in curve} | {d[0] for d in drawn})
    ax.set_xscale('log', base=2)
    ax.xaxis.set_major_locator(FixedLocator(fractions))
    ax.xaxis.set_major_formatter(FuncFormatter(
        lambda f, _: '1' if f >= 1 else f'1/{1 / f:.3g}' if (1 / f).is_integer() else f'{f:g}'))
    ax.set_xlabel('training data fraction (log2)')
    ax.set_ylabel(f'{metric} ({pooled_text})', fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_parallel(rows, keys, metric, path):
    """One polyline per finished trial across its searched values, coloured by the metric."""
    import matplotlib.pyplot as plt
    import numpy as np
    axes = keys + [metric]
    cols, marks = [], []  # per axis: values scaled to [0, 1]; (position, text) tick labels
    for k in axes:
        values = [r.get(k) for r in rows]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            x = np.asarray(values, dtype=float)
            log = k != metric and (x > 0).all() and x.max() / x.min() > 20  # learning rates
            x = np.log10(x) if log else x
            lo, hi = x.min(), x.max()
            fmt = (lambda v: f'{10 ** v:.2g}') if log else (lambda v: f'{v:.3g}')
            marks.append([(0.0, fmt(lo)), (1.0, fmt(hi))] if hi > lo else [(0.5, fmt(lo))])
        else:  # booleans and strings: evenly spaced categories
            cats = sorted({str(v) for v in values})
            x = np.asarray([cats.index(str(v)) for v in values], dtype=float)
            lo, hi = 0.0, float(len(cats) - 1)
            marks.append([((i - lo) / (hi - lo) if hi > lo else 0.5, c)
                          for i, c in enumerate(cats)])
        cols.append((x - lo) / (hi - lo) if hi > lo else np.full_like(x, 0.5))
    data = np.stack(cols, axis=1)
    score = np.asarray([r[metric] for r in rows], dtype=float)
    cmap = plt.get_cmap('viridis')
    norm = plt.Normalize(score.min(), score.max() if score.max() > score.min() else score.min() + 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(axes)), 4.5))
    for line, s in sorted(zip(data, score), key=lambda p: p[1]):
        ax.plot(range(len(axes)), line, color=cmap(norm(s)), alpha=0.8)
    for i, axis_marks in enumerate(marks):
        ax.axvline(i, color='grey', lw=0.8)
        for y, text in axis_marks:
            ax.text(i + 0.03, y, text, ha='left', va='center', fontsize=7,
                    bbox=dict(facecolor='white', edgecolor='none', alpha=0.7, pad=1))
    ax.set_xticks(range(len(axes)), [_short(k) for k in axes], fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.05, 1.05)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=metric)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cost_axis(rows):
    """GPU-hours when the trials ran on GPUs, else worker-hours (CPU sweeps); None without
    cost metrics (a sweep from before they were recorded)."""
    for key, label in (('cost.gpu_hours', 'GPU-hours'), ('cost.worker_hours', 'worker-hours')):
        if rows and all(key in r for r in rows) and any(r[key] > 0 for r in rows):
            return key, label
    return None


def _plot_cost(rows, keys, metric, axis, path):
    """Each finished trial's metric against what it cost, coloured by head variant."""
    import matplotlib.pyplot as plt
    key, label = axis
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in sorted({variant_label(r, keys) for r in rows}):
        pts = [r for r in rows if variant_label(r, keys) == variant]
        ax.scatter([r[key] for r in pts], [r[metric] for r in pts], label=variant, s=30)
    ax.set_xlabel(f'{label} per trial')
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_classes(best, path):
    import matplotlib.pyplot as plt
    classes = sorted(k for k in best if k.startswith('IoU.'))
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(classes) + 2), 4))
    ax.bar([c[4:] for c in classes], [best[c] for c in classes], color='tab:blue')
    ax.set_ylim(0, 1)
    ax.set_ylabel('IoU')
    ax.set_title(f'per-class IoU of the best trial ({best["trial_id"]})', fontsize=10)
    ax.tick_params(axis='x', rotation=90 if len(classes) > 12 else 0, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _reference_section(references, label, metric):
    if not references:
        return []
    return [f'Published reference ({label}), drawn as black stars beside the head variant it '
            'belongs to:', '',
            format_table(['fraction', f'published {metric}', 'ours (mean)', 'std', 'n', 'variant'],
                         [[('' if v is None else v) for v in r] for r in references],
                         markdown=True), '']


def _importance_section(results):
    from orchestrator.compare import MIN_TRIALS, importance_rows, noise_share
    rows = importance_rows(results)
    if not rows:
        return []
    noise = results.noise_keys()
    configuration = [k for k in results.searched if k not in noise]
    share = noise_share(results.completed(), configuration, results.metric) if noise else None
    floor = ([f'Noise floor: {share:.3f} of the {results.metric} variance (over all trials) '
              f'lies between trials of one configuration ({", ".join(noise)} apart). The '
              f'importances above share the rest among the searched values: a value\'s part '
              f'of all the variance is its importance x {1 - share:.3f}.', '']
             if share is not None else [])
    return ['## Which searched value matters', '',
            f'Share of the {results.metric} variance each searched value explains (Optuna\'s '
            f'fANOVA over the trials that completed their schedule; a scope needs '
            f'{MIN_TRIALS}+ of them' + (f'; {", ".join(noise)}: noise, not a factor' if noise
                                         else '') + '):', '',
            format_table(['scope', 'searched value', 'importance'],
                         [[s, k, f'{v:.3f}'] for s, k, v in rows], markdown=True), '',
            *floor]


def _updates_section(rows):
    """Fine-tuned backbones: how much of each trial's backbone its last interval changed
    (mmseg_custom/hooks/backbone_updates.py)."""
    key = 'backbone.changed_fraction'
    rows = [r for r in rows if key in r]
    if not rows:
        return []
    return ['## How much of the backbone training changed', '',
            'The fraction of the backbone\'s trainable weights that changed in each trial\'s '
            'last evaluation interval (MLflow metric `backbone.changed_fraction`, every '
            'evaluation): bfloat16 weights without float32 master copies round updates below '
            'half a bfloat16 step away (`fine_tuning.float32_master_weights: true` keeps them).',
            '',
            format_table(['trial', 'name', 'changed in the last interval'],
                         [[r['trial_id'], r['name'], f'{r[key]:.2%}'] for r in rows],
                         markdown=True), '']


def _write_figures(results, out, ranked):
    """The curve's CSV and the report's PNGs in ``out``; (curve, references, their label, the
    cost axis or None)."""
    import csv
    import os
    import matplotlib
    matplotlib.use('Agg')
    metric, keys = results.metric, results.searched
    curve = fraction_curve(results)
    with open(os.path.join(out, CURVE_CSV), 'w', newline='') as f:
        writer = csv.DictWriter(f, ['variant', 'fraction', 'mean', 'std', 'n', 'stopped'])
        writer.writeheader()
        writer.writerows(curve)
    references = reference_rows(results, curve)
    label = (results.references or {}).get('label', 'published')
    _plot_curve(curve, metric, os.path.join(out, CURVE_PNG), references, label, pooled(results))
    _plot_parallel(ranked, keys, metric, os.path.join(out, PARALLEL_PNG))
    axis = cost_axis(ranked)
    if axis:
        _plot_cost(ranked, results.line_keys(), metric, axis, os.path.join(out, COST_PNG))
    _plot_classes(ranked[0], os.path.join(out, CLASSES_PNG))
    return curve, references, label, axis


def write_report(results):
    """Write ``<sweep>/report/`` (report.md, PNGs, the CSV behind the curve) and attach it to
    the sweep's parent MLflow run under ``report/``. Returns the report's path."""
    import os
    out = os.path.join(results.sweep_dir, REPORT_DIR)
    os.makedirs(out, exist_ok=True)
    metric, keys = results.metric, results.searched
    everything, ranked = results.ranked(), results.completed()
    if not ranked:
        raise ConfigError(f'{results.sweep_dir}: no trial completed its schedule with metric '
                          f'{metric}: nothing to report')
    curve, references, label, axis = _write_figures(results, out, ranked)
    best = ranked[0]
    name = results.parent.data.tags.get('sweep', osp.basename(results.sweep_dir))
    failed = [r for r in results.rows() if r['status'] != 'FINISHED']
    stopped = stopped_rows(results)
    lines = [
        f'# Sweep `{name}`', '',
        f'{len(ranked)} trial(s) completed their schedule, {len(stopped)} stopped early by the '
        f'scheduler, {len(failed)} other(s); MLflow: {results.tracking_uri}, parent run '
        f'`{results.parent.info.run_id}`.', '',
        f'Best: trial `{best["trial_id"]}`, {metric} = {best[metric]:.4f} '
        f'({variant_label(best, keys)}).', '',
        f'## {metric} vs training data fraction', '', f'![curve]({CURVE_PNG})', '',
        f'Each point: {pooled(results)}, over the trials that completed their schedule (n); '
        'trials stopped early are counted apart and not averaged in.', '',
        format_table(['line', 'fraction', 'mean', 'std', 'n', 'stopped early'],
                     [['' if c[k] is None else c[k]
                       for k in ('variant', 'fraction', 'mean', 'std', 'n', 'stopped')]
                      for c in curve], markdown=True), '',
        *_reference_section(references, label, metric),
        *_importance_section(results),
        '## Searched values against the metric', '', f'![parallel]({PARALLEL_PNG})', '',
        *(['## What it cost', '', f'{metric} against {axis[1]} per completed trial (all '
           f'finished trials, stopped ones included: '
           f'{sum(r.get(axis[0], 0.0) for r in everything):.3g} {axis[1]}).', '',
           f'![cost]({COST_PNG})', ''] if axis else []),
        *_updates_section(everything),
        '## Per-class IoU of the best trial', '', f'![classes]({CLASSES_PNG})', '',
        '## All finished trials, best first', '',
        format_table(['trial', 'name', *map(_short, keys), metric, 'schedule'],
                     [[r['trial_id'], r['name'], *[r.get(k) for k in keys], r[metric],
                       'complete' if r['complete'] else
                       f'stopped early at iteration {r["iters"]} of {r["planned"]}']
                      for r in everything], markdown=True),
    ]
    if stopped:
        lines += ['', '## Stopped early (not averaged into the curve)', '', format_table(
            ['trial', 'name', metric, 'schedule'], stopped, markdown=True)]
    if failed:
        lines += ['', '## Not finished', '', format_table(
            ['trial', 'status', 'reason'],
            [[r['trial_id'], r['status'], r['failure_reason']] for r in failed], markdown=True)]
    path = os.path.join(out, 'report.md')
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    results.client.log_artifacts(results.parent.info.run_id, out, REPORT_DIR)
    return path
