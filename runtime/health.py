"""systemd notifications and the main loop's health check.

``Notifier`` speaks sd_notify (READY=1, WATCHDOG=1, RELOADING=1, STOPPING=1,
STATUS=...) when systemd gave us a NOTIFY_SOCKET, and does nothing
otherwise. ``Health`` is ticked by the main loop itself: it sends WATCHDOG=1
only when that loop iterated recently AND every source's transport is alive
AND no sink failed since the last check. A hung loop therefore stops the
pings by itself, and systemd (WatchdogSec=) restarts the service.

A disconnected broker does not make the daemon unhealthy: paho keeps
reconnecting and the outbox keeps the decisions, and a restart would not
bring the broker back. A dead transport thread does.
"""
from __future__ import annotations

import logging
import os
import time

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
        self._last_iteration = time.monotonic()
        self.slow_iterations = 0
        self.healthy = True
        self.reasons: list[str] = []

    def due(self, now: float) -> bool:
        """Called once per loop iteration; True when a check is due."""
        gap = now - self._last_iteration
        self._last_iteration = now
        if self.watchdog_s and gap > self.watchdog_s:
            self.slow_iterations += 1
            log.warning("main loop iteration took %.1f s, longer than the watchdog (%.1f s)",
                        gap, self.watchdog_s)
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
