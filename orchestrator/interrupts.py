"""SIGINT (Ctrl-C) and SIGTERM (how Slurm and Kubernetes preempt) during a sweep.

The first one stops the sweep through Ray Tune's own graceful path: Tune always listens on
SIGUSR1 while it fits (it then saves its experiment state, stops the trials and returns), so our
handler calls Tune's. Before Tune's loop starts the handler raises ``SweepInterrupted`` at once.
A second signal ends the process from the handler (``end_at_once``: the driver's last words,
then ``os._exit``): an exception raised there can land in a garbage-collector callback or a
library's ``except``, which swallows it with a traceback. Ray's handlers are replaced: its C++
one answered SIGTERM with a crash dump and SIGABRT, its Python one with ``sys.exit``. Before
Tune's stop, ``before_stop`` stops each trial group's heads at one iteration (crew.halt_groups).
The driver then closes the MLflow runs (driver.py) and exits 128 + the signal's number.
"""
import os
import signal
import threading

STOPS = (signal.SIGINT, signal.SIGTERM)
# Tune's SIGINT handler would replace ours; with it off Tune still handles SIGUSR1
os.environ['TUNE_DISABLE_SIGINT_HANDLER'] = '1'


class SweepInterrupted(KeyboardInterrupt):
    """A stop signal ended the sweep before Tune could stop it gracefully (before its loop);
    ``signum`` None: a stop the sweep requested itself (a full disk)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name if signum else 'a stop request')
        self.signum = signum


class StopSignals:
    """Installed after ``ray.init`` (which sets handlers of its own), restored at the end."""

    def __init__(self):
        self.signum = None  # the first stop signal received
        self.reason = None  # or why the sweep stopped itself (request)
        self.fitting = False  # Tune's loop may be running: its SIGUSR1 handler stops it
        self._previous = {}
        self._stopping = False
        self.end_at_once = None  # the driver's: (first, this signal, reason) -> exits
        self.say = None  # the driver's: prints a line from the handler
        self.before_stop = None  # the driver's: what must stop before Tune stops the trials

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else None

    @property
    def exit_code(self):
        return 128 + self.signum if self.signum else None

    def install(self):
        # SIGUSR1 too: until Tune takes it over, it is ours (its default action kills)
        for signum in (*STOPS, signal.SIGUSR1):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def request(self, reason):
        """Stop the sweep as a first signal would, for ``reason``; from any thread (the handler
        runs in the main thread, where Tune's loop does)."""
        if self.reason is None and self.signum is None:
            self.reason = reason
            if not self._previous:  # not installed yet: the driver reads the reason later
                return
            if signal.getsignal(signal.SIGUSR1) != self._handle:  # Tune's: a graceful stop
                self._stopping = True
                self._before_stop()
            os.kill(os.getpid(), signal.SIGUSR1)

    def _handle(self, signum, frame):
        if self._stopping:
            if self.end_at_once is not None:
                self.end_at_once(self.signum, signum, self.reason)
            raise SweepInterrupted(self.signum or signum)
        self._stopping = True
        if not (signum == signal.SIGUSR1 and self.reason):  # a signal, not our request
            # SIGUSR1 sent by a user before Tune listens: an interruption too
            self.signum = signal.SIGINT if signum == signal.SIGUSR1 else signum
        tune_handler = signal.getsignal(signal.SIGUSR1)
        if not (self.fitting and callable(tune_handler) and tune_handler != self._handle):
            raise SweepInterrupted(self.signum)
        if self.signum and self.say is not None:
            self.say(f'{self.name}: stopping the trials at their latest checkpoint (a second '
                     'one ends the sweep at once, still resumable)')
        self._before_stop()
        tune_handler(signal.SIGUSR1, frame)  # Tune stops at its next step

    def _before_stop(self, within_s=10.0):
        """``before_stop``, in a thread of its own (a handler may have interrupted the main
        thread inside Ray's client), waited for ``within_s`` at most."""
        if self.before_stop is not None:
            helper = threading.Thread(target=self.before_stop, name='before-stop', daemon=True)
            helper.start()
            helper.join(within_s)
