"""Text tables: the ranked table a sweep ends with (from Tune's results), in the one table format
that status, compare and report also print."""
from prettytable import PrettyTable, TableStyle

from orchestrator.errors import failure_reason
from orchestrator.sweep_plan import flat_config


def format_table(header, rows, markdown=False):
    t = PrettyTable(header)
    if markdown:
        t.set_style(TableStyle.MARKDOWN)
    else:
        t.align = 'l'
    for row in rows:
        t.add_row([f'{v:.4g}' if isinstance(v, float) else v for v in row])
    return t.get_string()


def ranked_results(result_grid, keys, metric='mIoU', mode='max'):
    """(header, rows, failures) from a Tune ResultGrid, best first; failed trials listed apart."""
    done, failed = [], []
    for r in result_grid:
        trial_id = (r.metrics or {}).get('trial_id', '?')
        values = [flat_config(r.config).get(k) for k in keys]
        if r.error is not None or metric not in (r.metrics or {}):
            reason = failure_reason(r.error) if r.error else 'no metric reported'
            failed.append([trial_id, *values, reason])
            continue
        trained, planned = r.metrics.get('iter'), r.metrics.get('max_iters')
        schedule = ('complete' if trained is None or planned is None or trained >= planned
                    else f'stopped early ({trained} of {planned})')
        done.append([trial_id, *values, r.metrics[metric], trained, schedule,
                     r.metrics.get('time_total_s', 0.0)])
    done.sort(key=lambda row: row[len(keys) + 1], reverse=(mode == 'max'))
    header = ['trial', *keys, metric, 'iters', 'schedule', 'time_s']
    return header, done, failed
