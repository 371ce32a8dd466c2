"""systemd's watchdog: WATCHDOG=1 every WATCHDOG_USEC/2 while every part of
vajrad is healthy, so that systemd restarts a daemon that is wedged rather
than one that is slow.

The pings come from a thread of their own. The event loop proves that it
turns by running a heartbeat callback; the thread compares the time since the
last beat with a limit. A loop that is blocked (a slow call made on it by
mistake, a lock it waits for) is thus seen and said in STATUS, rather than
only falling silent, and the thread's own sleep is never taken for loop lag
(it sleeps WATCHDOG_USEC/2, 15 s under the shipped unit's WatchdogSec=30s).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable

from vajrad.notify import Notifier
from vajrad.threads import name_native_thread

log = logging.getLogger(__name__)

# The loop counts as wedged once it has not run its heartbeat for this long:
# at most LOOP_STALL_MAX_S (a busy host delays callbacks by a second or two
# without anything being wrong), at least LOOP_STALL_MIN_S, and otherwise
# twice the ping interval, so a short WatchdogSec is not outlived by the limit.
LOOP_STALL_MAX_S = 5.0
LOOP_STALL_MIN_S = 1.0
HEARTBEATS_PER_LIMIT = 5


def loop_stall_limit(interval: float) -> float:
    return min(LOOP_STALL_MAX_S, max(LOOP_STALL_MIN_S, 2 * interval))


class Watchdog:
    def __init__(self, notifier: Notifier, interval: float, parts: Callable[[], list[str]]):
        """parts() names what is unhealthy besides the loop; it is called on
        the watchdog's thread, so it only reads state."""
        self.notifier = notifier
        self.interval = interval
        self.parts = parts
        self.stall_limit = loop_stall_limit(interval)
        self.last_beat = time.monotonic()
        self.withheld = 0               # pings not sent because something was unhealthy
        self._loop: asyncio.AbstractEventLoop | None = None
        self._beat_handle: asyncio.TimerHandle | None = None
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported: list[str] = []

    def start(self) -> None:
        """On the event loop."""
        self._loop = asyncio.get_running_loop()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="vajra-watchdog", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self.last_beat = time.monotonic()
        self._beat_handle = self._loop.call_later(self.stall_limit / HEARTBEATS_PER_LIMIT, self._beat)

    def problems(self) -> list[str]:
        found = []
        if time.monotonic() - self.last_beat > self.stall_limit:
            found.append(f"event loop has not turned for over {self.stall_limit:.1f} s")
        return found + self.parts()

    def _run(self) -> None:
        name_native_thread("vajra-watchdog")
        while not self._halt.wait(self.interval):
            problems = self.problems()
            if problems:
                self.withheld += 1
                self.notifier.status("unhealthy: " + "; ".join(problems))
                if problems != self._reported:     # once per change, not every interval
                    log.warning("withholding watchdog ping: %s", "; ".join(problems))
            else:
                if self._reported:
                    log.warning("healthy again: watchdog pings resume")
                self.notifier.watchdog()
            self._reported = problems

    async def stop(self) -> None:
        self._halt.set()
        if self._beat_handle is not None:
            self._beat_handle.cancel()
            self._beat_handle = None
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
