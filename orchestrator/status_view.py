"""The status as text: the per-trial table, the one-line summary, a line per worker restart
(``orchestrator status`` and the live view during a sweep)."""
from orchestrator.tables import format_table


def _dur(seconds):
    if seconds is None:
        return '?'
    seconds = int(seconds)
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else \
        f'{seconds // 60}m{seconds % 60:02d}s'


def summary_line(summary):
    s = summary
    return (f'{s["sweep"].lower()}: {s["done"] + s["stopped"]}/{s["total"]} done'
            + (f' ({s["stopped"]} stopped early)' if s['stopped'] else '')
            + f', {s["running"]} running, {s["pending"]} pending, {s["failed"]} failed'
            + (f', {s["interrupted"]} interrupted' if s['interrupted'] else '')
            + (f'; elapsed {_dur(s["elapsed_s"])}' if s['elapsed_s'] is not None else '')
            + (f', ETA {_dur(s["eta_s"])}' if s['eta_s'] is not None else ''))


def format_status(trials, summary):
    metric, searched = summary['metric'], summary['searched']
    rows = []
    for t in sorted(trials, key=lambda t: t['trial']):
        progress = f'{t["iter"]}/{t["max_iters"] or "?"}'
        eta = _dur(t['eta_s']) if t.get('eta_s') is not None else ''
        rows.append([t['trial'], *[t['params'].get(k, '') for k in searched], t['state'],
                     progress, '' if t['metric'] is None else f'{t["metric"]:.4f}', eta,
                     t['reason'][:80]])
    header = ['trial', *[k.rsplit('.', 1)[-1] if k.startswith('model.') else k
                         for k in searched], 'state', 'iter', metric, 'ETA', 'reason']
    table = format_table(header, rows) if rows else ''
    restarts = ''.join(line + '\n' for line in restart_lines(trials))
    return (table + '\n' if table else '') + restarts + summary_line(summary)


def restart_lines(trials):
    """One line per restart of a trial whose worker was lost (trial.py records them) and per
    checkpoint a resume could not read (orchestrator/checkpoints.py)."""
    lines = []
    for t in sorted(trials, key=lambda t: t['trial']):
        lines += [f'trial {t["trial"]}: worker lost at iteration {r["lost_at"]}; restart '
                  f'{r["restart"]} of {r["of"]} from iteration {r["resume_from"]}'
                  for r in t.get('restarts', [])]
        lines += [f'trial {t["trial"]}: checkpoint {r["file"]} could not be read ({r["why"]}); '
                  f'resumed from the newest readable one before it, or the start (kept as '
                  f'{r["file"]}.unreadable)'
                  for r in t.get('skipped_checkpoints', [])]
    return lines
