"""The status during ``orchestrator sweep``, as a Ray Tune callback: on a terminal the table is
redrawn in place; elsewhere (CI logs, ``| tee``) one summary line when a count changes."""
import os
import sys
import time

from ray.tune import Callback

from orchestrator.status import JournalTail, sweep_status
from orchestrator.status_view import format_status, restart_lines, summary_line


class LiveStatus(Callback):
    """The status during ``orchestrator sweep``: on a terminal the table is redrawn in place
    every ``interval_s``; elsewhere (CI logs, ``| tee``) one summary line when a count changes."""

    def __init__(self, sweep_dir, out=None, interval_s=2.0):
        self.sweep_dir, self.out, self.interval_s = sweep_dir, out or sys.stdout, interval_s
        self._last, self._last_line, self._drawn = 0.0, None, 0
        self._journal = JournalTail(sweep_dir)
        self._restarts_shown = set()

    def __getstate__(self):  # Tune pickles its callbacks with the experiment (for --resume)
        return dict(self.__dict__, out=None, _drawn=0, _journal=JournalTail(self.sweep_dir))

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.out = self.out or sys.stdout

    def printed_below(self):
        """Someone printed under the drawing (the first stop signal's line): the next one goes
        below it instead of moving up over it."""
        self._drawn = 0

    def _tty(self):
        return hasattr(self.out, 'isatty') and self.out.isatty() and \
            os.environ.get('TERM', 'dumb') != 'dumb'

    def show(self, force=False, final=False):
        if not force and time.time() - self._last < self.interval_s:
            return
        if final:  # printed below whatever Tune logged at its end, not over it
            self._drawn = 0
        self._last = time.time()
        try:
            trials, summary = sweep_status(self.sweep_dir, self._journal)
        except (OSError, ValueError, KeyError):  # not yet written (a ConfigError is a ValueError)
            return
        if self._tty():
            text = format_status(trials, summary)
            # move up over the previous drawing and clear it
            prefix = f'\x1b[{self._drawn}F\x1b[J' if self._drawn else ''
            self.out.write(prefix + text + '\n')
            self._drawn = text.count('\n') + 1
        else:
            for line in restart_lines(trials):
                if line not in self._restarts_shown:
                    self._restarts_shown.add(line)
                    self.out.write(f'[{time.strftime("%H:%M:%S")}] {line}\n')
            line = summary_line(dict(summary, eta_s=None, elapsed_s=None))
            if line != self._last_line:
                self._last_line = line
                self.out.write(f'[{time.strftime("%H:%M:%S")}] {summary_line(summary)}\n')
        self.out.flush()

    def on_step_end(self, iteration, trials, **info):
        self.show()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.show(force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.show(force=True)
