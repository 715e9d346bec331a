"""systemd notifications, the main loop's health check and its stall monitor.

``Notifier`` speaks sd_notify (READY=1, WATCHDOG=1, RELOADING=1, STOPPING=1,
STATUS=...) when systemd gave us a NOTIFY_SOCKET, and does nothing
otherwise. ``Health`` is ticked by the main loop itself: it sends WATCHDOG=1
only when that loop iterated recently AND every source's transport is alive
AND no sink failed since the last check. A hung loop therefore stops the
pings by itself, and systemd (WatchdogSec=) restarts the service.

A hung loop cannot report itself, though: the ``edgefuse_healthy`` and
``edgefuse_ready`` gauges it sets would keep their last value. ``StallMonitor``
is a small thread of its own that only watches the time of the loop's last
completed iteration; past ``stall_timeout_s`` it marks the daemon stalled
(gauges to 0), logs how long and where the loop is stuck, and clears the mark
when the loop moves again. It never pings the watchdog: only the loop does.

A disconnected broker does not make the daemon unhealthy: paho keeps
reconnecting and the outbox keeps the decisions, and a restart would not
bring the broker back. A dead transport thread does.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


class Notifier:
    """sd_notify over $NOTIFY_SOCKET (sdnotify); a no-op outside systemd."""

    def __init__(self) -> None:
        self._notifier = None
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify
            self._notifier = sdnotify.SystemdNotifier()

    @property
    def enabled(self) -> bool:
        return self._notifier is not None

    def notify(self, *fields: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(fields))


def watchdog_interval_s() -> float | None:
    """systemd's WatchdogSec for this process (WATCHDOG_USEC), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not an integer; watchdog disabled", usec)
        return None
    return value / 1e6 if value > 0 else None


class Health:
    """The main loop's own check; see the module docstring."""

    def __init__(self, notifier: Notifier, interval_s: float | None = None):
        self.notifier = notifier
        self.watchdog_s = interval_s if interval_s is not None else watchdog_interval_s()
        # ping at half the watchdog interval; check at least once a second anyway
        self.period_s = min(1.0, self.watchdog_s / 2) if self.watchdog_s else 1.0
        self._last_check = time.monotonic()
        self.healthy = True
        self.reasons: list[str] = []

    def due(self, now: float) -> bool:
        """Called once per loop iteration; True when a check is due."""
        return now - self._last_check >= self.period_s

    def check(self, now: float, sources, sink_failures: int) -> bool:
        """Decide health; send WATCHDOG=1 when healthy."""
        self._last_check = now
        reasons = [f"source {i} transport thread died" for i, s in enumerate(sources)
                   if not s.alive]
        if sink_failures:
            reasons.append(f"{sink_failures} sink failure(s) since the last check")
        if reasons != self.reasons and reasons:
            log.error("unhealthy: %s", "; ".join(reasons))
        self.reasons = reasons
        self.healthy = not reasons
        if self.healthy and self.watchdog_s:
            self.notifier.notify("WATCHDOG=1")
        return self.healthy


STALL_REPEAT_S = 30.0  # while stuck, the error is repeated this often (with the duration)


class StallMonitor:
    """Marks the main loop stalled when it completes no iteration for ``timeout_s``.

    The loop calls ``beat()`` after every iteration (one attribute store, no
    lock: a float assignment is atomic under the GIL). The monitor thread wakes
    a few times per timeout and calls ``check(now)``, which the tests can also
    drive directly with their own clock. ``on_change(stalled)`` is called from
    the monitor thread on every transition; it must be quick and thread-safe.
    """

    def __init__(self, timeout_s: float, on_change: Callable[[bool], None], *,
                 watched: threading.Thread | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if not timeout_s > 0:
            raise ValueError(f"stall timeout must be > 0 s, found {timeout_s!r}")
        self.timeout_s = timeout_s
        self._on_change = on_change
        self._clock = clock
        self._watched = watched or threading.current_thread()
        self._last = clock()
        self._since = 0.0          # the last beat before the current stall
        self._next_log = 0.0
        self.stalled = False
        self.stalls = 0            # stall episodes since start
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """The loop completed an iteration."""
        self._last = self._clock()

    def idle_s(self) -> float:
        """Seconds since the loop last completed an iteration."""
        return max(0.0, self._clock() - self._last)

    def start(self, watched: threading.Thread | None = None) -> None:
        """Start watching (``watched``: the loop's thread, if not the constructor's)."""
        if self._thread is not None:
            return
        if watched is not None:
            self._watched = watched
        self.beat()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="loop-stall-monitor",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)

    def check(self, now: float) -> bool:
        """Update and return the stalled state (see the class docstring)."""
        last = self._last
        idle = now - last
        if idle >= self.timeout_s:
            if not self.stalled:
                self.stalled, self._since = True, last
                self.stalls += 1
                self._next_log = now + STALL_REPEAT_S
                log.error("main loop stuck: no iteration completed for %.1f s (stall_timeout_s "
                          "%.1f s), now in %s; reporting unhealthy and not ready until it "
                          "moves again", idle, self.timeout_s, self.where())
                self._on_change(True)
            elif now >= self._next_log:
                self._next_log = now + STALL_REPEAT_S
                log.error("main loop still stuck after %.0f s, now in %s", idle, self.where())
        elif self.stalled:
            self.stalled = False
            log.warning("main loop moving again after being stuck for %.1f s",
                        last - self._since)
            self._on_change(False)
        return self.stalled

    def where(self) -> str:
        """The watched thread's innermost Python frame, e.g. 'flush (sinks.py:81)'."""
        frame = sys._current_frames().get(self._watched.ident)
        if frame is None:
            return "an unknown place (the thread is gone)"
        code = frame.f_code
        return f"{code.co_name} ({Path(code.co_filename).name}:{frame.f_lineno})"

    def _run(self) -> None:
        period = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(period):
            try:
                self.check(self._clock())
            except Exception:  # noqa: BLE001 - the monitor must outlive a bad callback
                log.exception("the stall monitor's check failed")
