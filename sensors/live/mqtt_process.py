"""MQTT source whose network loop runs in a child process (``receiver = "process"``).

The child (``sensors.live.mqtt_receiver``) subscribes, does the checks (topic,
size, modality: the Subscriber owns them) and writes frames to a pipe. This
side owns no thread: ``read()`` waits on the pipe, parses the frames that
have arrived and decodes the payloads (``base.decode_payload``, as the
in-process source does), in the caller's thread. Apart from the transport it
behaves like ``MqttThreadSource``, through the same protocol (base.Source):
the same counters (the child's and this side's are added up, and survive a
restart of the child), ``wait_connected()`` (subscribed), ``last_error``
(the child's, carried in its status lines).

Without a thread of its own, this source moves its data when it is called:
``read()`` and ``wait_connected()`` take in frames and status lines and start
a child that is due to restart; ``stats()`` takes in what has arrived but
starts nothing; the properties (``last_error``, ``alive``) only report what
the last of those calls saw. The daemon calls ``read()`` on every iteration.

This side decodes only while its queue (``queue_max`` chunks) has room, and
leaves the rest in the pipe, so a consumer that falls behind pushes back to
the child, which holds up to ``receiver_queue_bytes`` and only then drops the
oldest frames (counted in ``dropped_queue_full``). Nothing is dropped that
memory could hold.

The child is restarted when it exits unexpectedly, after a delay that doubles
from RESTART_MIN_S to RESTART_MAX_S (runtime.core.backoff; reset once a child
subscribes); each start is counted in ``receiver_starts``. The child exits by
itself when this process dies, because its stdin reaches EOF.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, replace

from edgefuse.runtime.core.backoff import Backoff
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import TransportError
from edgefuse.sensors.live.accounting import RejectedMessage, count_rejection
from edgefuse.sensors.live.base import ClockCheck, decode_payload
from edgefuse.sensors.live.mqtt_client import load_secrets
from edgefuse.sensors.live.mqtt_receiver import FRAME, MESSAGE
from edgefuse.sensors.live.mqtt_source import MqttSourceBase, MqttSourceSettings

log = logging.getLogger(__name__)

RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
CLOSE_TIMEOUT_S = 5.0
PIPE_BYTES = 1 << 20   # asked of the kernel for the pipe; 64 KiB when refused
READ_BYTES = 1 << 20
EXITED = "the MQTT receiver process exited"


class MqttProcessSource(MqttSourceBase):
    """See the module docstring."""

    COUNTERS = MqttSourceBase.COUNTERS + ("receiver_starts",)

    def __init__(self, settings: MqttSourceSettings | None = None, *,
                 modalities: Iterable[str] | None = None,
                 clock_check: ClockCheck | None = None):
        super().__init__(settings, modalities=modalities, clock_check=clock_check)
        self._lock = threading.RLock()   # the pipe and the child's state
        self._proc: subprocess.Popen | None = None
        self._buf = bytearray()
        self._status_fd: int | None = None  # the child's status pipe (read end)
        self._status_buf = b""
        self._child_status: dict = {}     # the running child's last status line
        self._exited: dict = {}           # counters of children that exited, summed
        self._connected = False
        self._restart_at: float | None = None
        self._restart = Backoff(RESTART_MIN_S, RESTART_MAX_S)
        self._client_id = self.settings.mqtt.resolved_client_id("source")

    # --- interface -----------------------------------------------------------
    def open(self) -> None:
        with self._lock:
            if self._opened and (self._proc is not None or self._restart_at is not None):
                return
            # A missing or malformed secret fails here (ConfigError), not in the child.
            load_secrets(self.settings.mqtt)
            self._opened = True
            self._spawn()
        log.info("MQTT source (receiver process) connecting to %s:%d, topic filters %s",
                 self.settings.mqtt.host, self.settings.mqtt.port, self.filters)

    def close(self) -> None:
        with self._lock:
            self._restart_at = None
            proc = self._proc
            if proc is None:
                return
            try:
                proc.stdin.close()  # the child disconnects, writes what it has, exits
            except OSError:
                pass
            deadline = time.monotonic() + CLOSE_TIMEOUT_S
            while self._proc is proc and time.monotonic() < deadline:
                self._pump(0.05, closing=True)
            if self._proc is proc:
                log.error("the MQTT receiver process did not exit within %.0f s; killed",
                          CLOSE_TIMEOUT_S)
                proc.kill()
                self._child_exited(closing=True)

    def _transport_up(self) -> bool:
        return self._connected  # as of the last status line taken in

    def wait_connected(self, timeout_s: float) -> bool:
        """True once the broker acknowledged the current session's subscription.
        Takes in what the child sent first, so a child that died is noticed."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        self._pump(0.0)
        while not self._subscribed.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._pump(min(0.05, left))
        return True

    def read(self, timeout_s: float) -> list[Chunk]:
        if not self._opened:
            raise TransportError(f"{type(self).__name__}.read() called before open()")
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            self._pump(max(0.0, deadline - time.monotonic()))
            out = super().read(0.0)
            if out or time.monotonic() >= deadline or self._closed():
                return out

    def stats(self) -> dict:
        """Takes in what the child has sent (without waiting; it starts no child)."""
        self._pump(0.0, restart=False)
        snap = super().stats()
        with self._lock:
            children = [self._exited, self._child_status]
            for child in children:
                for name, value in child.get("counters", {}).items():
                    snap[name] = snap.get(name, 0) + value
                for reason, value in child.get("malformed", {}).items():
                    snap["malformed"][reason] = snap["malformed"].get(reason, 0) + value
        snap["malformed_total"] = sum(snap["malformed"].values())
        return snap

    def _closed(self) -> bool:
        return self._proc is None and self._restart_at is None

    # --- the child -------------------------------------------------------------
    def _spawn(self) -> None:
        mqtt = replace(self.settings.mqtt, client_id=self._client_id)  # stable across restarts
        settings = {"mqtt": asdict(mqtt), "topic_pattern": self.settings.resolved_pattern,
                    "partition": self.settings.partition,
                    "qos": self.settings.qos, "max_payload_bytes": self.settings.max_payload_bytes,
                    "filters": self.filters, "session_expiry_s": self.settings.session_expiry,
                    "allowed_modalities": None if self.allowed is None
                    else sorted(self.allowed),
                    "queue_bytes": self.settings.receiver_queue_bytes,
                    "log_level": logging.getLevelName(
                        logging.getLogger("edgefuse").getEffectiveLevel())}
        status_r, status_w = os.pipe()
        settings["status_fd"] = status_w
        try:
            proc = subprocess.Popen([sys.executable, "-m", "edgefuse.sensors.live.mqtt_receiver"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                                    pass_fds=(status_w,))
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        os.set_blocking(status_r, False)
        try:
            proc.stdin.write(json.dumps(settings).encode() + b"\n")
        except BrokenPipeError:
            pass  # the child died at once: the pipe's EOF is noticed by _pump
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ,
                        min(PIPE_BYTES, self.settings.receiver_queue_bytes))
        except OSError:  # over /proc/sys/fs/pipe-max-size for an unprivileged user
            pass
        self._proc, self._buf, self._child_status = proc, bytearray(), {}
        self._status_fd, self._status_buf = status_r, b""
        self._restart_at = None
        self._counters.add("receiver_starts")

    def _child_exited(self, *, closing: bool = False) -> None:
        proc, self._proc = self._proc, None
        try:
            code = proc.wait(CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        self._read_status()  # the child's last word: its final counts
        os.close(self._status_fd)
        self._status_fd = None
        for key in ("counters", "malformed"):
            total = self._exited.setdefault(key, {})
            for name, value in self._child_status.get(key, {}).items():
                total[name] = total.get(name, 0) + value
        self._child_status = {}
        self._buf = bytearray()
        if self._connected and not closing:
            self._exited["counters"]["disconnects"] = \
                self._exited["counters"].get("disconnects", 0) + 1
        self._connected = False
        self._subscribed.clear()
        if closing:
            return
        before = self._last_error or ""   # the cause before the first exit, kept once
        if before.startswith(EXITED):
            before = before.partition("; before that: ")[2]
        self._last_error = f"{EXITED} (status {code}); restarting it" + (
            f"; before that: {before}" if before else "")
        delay = self._restart.next()
        self._restart_at = time.monotonic() + delay
        log.error("the MQTT receiver process exited (status %s); restarting it in %.1f s",
                  code, delay)

    # --- the pipe ------------------------------------------------------------------
    def _pump(self, timeout_s: float, *, closing: bool = False, restart: bool = True) -> None:
        """Wait up to timeout_s for frames, then handle every whole frame that arrived;
        restart: start a child that is due (else leave that to the next read())."""
        with self._lock:
            proc = self._proc
            if proc is None:
                if self._restart_at is None or not restart:
                    return
                wait = self._restart_at - time.monotonic()
                if wait > 0:
                    time.sleep(min(timeout_s, wait))
                    return
                try:
                    self._spawn()
                except OSError as exc:  # out of processes or descriptors: try again later
                    delay = self._restart.next()
                    self._restart_at = time.monotonic() + delay
                    log.error("cannot start the MQTT receiver process (%s); retrying in %.1f s",
                              exc, delay)
                return
            fd = proc.stdout.fileno()
            if timeout_s > 0 and not self._room():
                timeout_s = 0.0  # a full queue: the caller should read first
            if timeout_s > 0:
                select.select([fd, self._status_fd], [], [], timeout_s)
            self._read_status()
            # Read only what there is room to decode: the rest waits in the pipe and
            # then in the child's bounded deque, where a real overflow is counted.
            # Closing reads everything (the child must be able to finish writing).
            while closing or len(self._buf) < READ_BYTES:
                try:
                    data = os.read(fd, READ_BYTES)
                except BlockingIOError:
                    break
                if not data:
                    self._parse(everything=True)
                    self._child_exited(closing=closing)
                    return
                self._buf += data
                if len(data) < READ_BYTES:
                    break
            self._parse(everything=closing)

    def _read_status(self) -> None:
        """Apply the newest whole status line the child wrote."""
        data = self._status_buf
        while True:
            try:
                more = os.read(self._status_fd, 1 << 16)
            except BlockingIOError:
                break
            if not more:
                break
            data += more
        *lines, self._status_buf = data.split(b"\n")
        if lines:
            self._on_status(json.loads(lines[-1]))

    def _room(self) -> bool:
        return self._queue.qsize() < self.settings.queue_max

    def _parse(self, *, everything: bool = False) -> None:
        """Decode whole frames while the queue has room (or all of them)."""
        buf, pos, size = self._buf, 0, len(self._buf)
        max_body = self.settings.max_payload_bytes
        while size - pos >= FRAME.size and (everything or self._room()):
            kind, node_len, modality_len, body_len, received_ns = FRAME.unpack_from(buf, pos)
            # Pipe integrity, not a payload check (the child's Subscriber owns that): the
            # child never frames more than max_body, so a longer frame means the pipe
            # is out of step, and the one way back in step is a new child.
            if kind != MESSAGE or body_len > max_body:
                log.error("the MQTT receiver process sent a corrupt frame (kind %d, %d bytes); "
                          "restarting it", kind, body_len)
                self._proc.kill()
                del buf[:]
                return
            start = pos + FRAME.size
            end = start + node_len + modality_len + body_len
            if end > size:
                break
            node = buf[start:start + node_len].decode()
            modality = buf[start + node_len:start + node_len + modality_len].decode()
            self._decode(bytes(buf[start + node_len + modality_len:end]), node, modality,
                         received_ns)
            pos = end
        del buf[:pos]

    def _decode(self, payload: bytes, node: str, modality: str, received_ns: int) -> None:
        try:
            chunk = decode_payload(payload, node, modality)
        except RejectedMessage as exc:
            count_rejection(self._counters, exc, **self.origin(node, modality), node=node,
                            modality=modality)
            return
        except Exception:  # noqa: BLE001 - one bad message must not stop the stream
            self._counters.malformed("internal_error")
            log.exception("unexpected error decoding a message from %s/%s; skipped",
                          node, modality)
            return
        self._offer(chunk, received_ns)  # counts it decoded (or refuses its clock)

    def _on_status(self, status: dict) -> None:
        self._child_status = status
        self._connected = bool(status.get("connected"))
        self._last_error = status.get("last_error")
        if status.get("subscribed"):
            self._subscribed.set()
            self._restart.reset()
        else:
            self._subscribed.clear()
