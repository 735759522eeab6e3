"""SIGINT/SIGTERM for the driver: the first stops handing out shards, the second exits now.

Python runs signal handlers only between bytecodes of the main thread, and two signals
that arrive while it is blocked in C (a `ray.wait`, a Ray start-up) run the handler once:
two SIGTERMs 0.1 s apart looked like one. CPython's C-level handler writes one byte per
delivered signal to the wakeup fd (Modules/signalmodule.c, `trip_signal`), so a thread
reading that pipe counts every signal, at once, whatever the main thread is doing.

The Python-level handlers stay ours from before Ray starts: `ray.init` installs a
SIGTERM handler that calls `sys.exit(15)` (ray/_private/worker.py `init`), so `reinstall`
is called again after it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_RECORD_S = 3.0  # most seconds a second signal waits for the state to be recorded


class SignalWatch:
    """Counts SIGINT/SIGTERM: the first sets `stop`; the second calls `exit_now` (which
    records the state) and ends the process with `exit_code`."""

    def __init__(self, stop: threading.Event, exit_now: Callable[[], None], exit_code: int):
        self.stop = stop
        self.exit_now = exit_now
        self.exit_code = exit_code
        self.active = threading.current_thread() is threading.main_thread()
        if not self.active:  # signals can only be handled in the main thread
            return
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
        self.reinstall()
        threading.Thread(target=self._watch, name="signal-watch", daemon=True).start()

    def reinstall(self) -> None:
        """Make our (do-nothing) Python handlers current again; the pipe does the work."""
        if self.active:
            for sig in SIGNALS:
                signal.signal(sig, _ignore)

    def _watch(self) -> None:
        count = 0
        while True:
            data = os.read(self._read, 64)
            if 0 in data:  # restore() is done with us
                os.close(self._read)
                os.close(self._write)
                return
            for signum in data:
                if signum not in SIGNALS:
                    continue
                count += 1
                name = signal.Signals(signum).name
                if count == 1:
                    log.warning("%s received: finishing shards in flight, then exiting "
                                "(send it again to exit now)", name)
                    self.stop.set()
                else:
                    log.error("second signal (%s): exiting now; rerun the same command to resume", name)
                    # Record the state if storage answers within a moment; exit regardless.
                    recorder = threading.Thread(target=self.exit_now, name="exit-now", daemon=True)
                    recorder.start()
                    recorder.join(EXIT_RECORD_S)
                    os._exit(self.exit_code)

    def restore(self) -> None:
        if not self.active:
            return
        self.active = False
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._previous_fd)
        os.write(self._write, b"\0")  # the watcher closes the pipe (never under a blocked read)


def _ignore(signum, frame) -> None:
    """The Python-level handler: nothing to do here, the watcher thread has seen the signal."""
