"""The MQTT receiver process: paho's network loop, away from the daemon's GIL.

``MqttSource`` with ``receiver = "process"`` (the default) runs
``python -m edgefuse.sensors.mqtt_receiver`` as a child. paho parses MQTT
packets in pure Python; at a few thousand messages a second that parsing,
sharing one GIL with the aligner and ONNX Runtime, was the largest single
cost in the daemon (a third of its busy time at 200 nodes). Here it runs on
another core, and the daemon reads ready-made frames from a pipe.

The child does the cheap checks of the in-process source, in the same order
(topic, reserved modality, size before any parsing, allowed modality) and
forwards each surviving payload untouched; the parent decodes it with the
same ``ChunkValidator`` as the in-process source, so both count the same
reasons. This module imports the standard library and paho only (no numpy):
the child costs about 22 MB of memory.

Protocol, no pickle:

- parent -> child, stdin: one JSON line of settings, then nothing. EOF (the
  parent closed the pipe, or died) means: disconnect, flush, exit 0.
- child -> parent, stdout (the data pipe): frames of ``FRAME`` (20 bytes,
  little-endian: kind u8 = MESSAGE, pad, node length u16, modality length
  u16, pad, payload length u32, received CLOCK_MONOTONIC ns i64), then node
  and modality (UTF-8), then the payload as received.
- child -> parent, the status pipe (file descriptor ``status_fd`` of the
  settings): JSON lines ``{"counters": {...}, "malformed": {...},
  "connected": bool, "subscribed": bool}``, on every connection change and at
  most every STATUS_PERIOD_S while counters move; the last line wins. Status
  has its own pipe so that it is never stuck behind data the parent is not
  ready to take.

The child ignores SIGTERM and SIGINT: systemd signals the whole control
group on stop, and the parent must decide when its input ends (it closes
stdin while draining). Frames wait in a deque for the writer thread, which writes
whatever has gathered with one system call, so the parent wakes once per
batch rather than once per message. Bounds: ``receiver_queue_bytes`` in the deque (when
full the oldest frames are dropped and counted in ``dropped_queue_full``),
the pipe (1 MiB where the kernel allows it), then the parent's ``queue_max``
chunks. A parent that stops reading thus costs drops, never memory.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import struct
import sys
import threading
import time
from collections import deque

from edgefuse.runtime import mqtt_client
from edgefuse.sensors.accounting import BAD_TOPIC, Counters, RejectedPayload, unknown_modality
from edgefuse.sensors.topics import RESERVED_MODALITIES, TopicPattern

log = logging.getLogger("edgefuse.sensors.mqtt_receiver")

FRAME = struct.Struct("<BxHHxxIq")
MESSAGE = 1
STATUS_PERIOD_S = 0.1
MAX_SETTINGS_BYTES = 1 << 16
COUNTERS = ("received", "oversized", "ignored", "dropped_queue_full", "connects",
            "reconnects", "disconnects", "subscribed", "connect_failures")


class Receiver:
    """paho client + bounded frame deque + writer thread; see the module docstring."""

    def __init__(self, settings: dict, out_fd: int, status_fd: int):
        self.mqtt = mqtt_client.MqttSettings.from_dict(settings["mqtt"])
        self.topics = TopicPattern(settings["topic_pattern"])
        self.qos = int(settings["qos"])
        self.max_payload = int(settings["max_payload_bytes"])
        allowed = settings.get("allowed_modalities")
        self.allowed = None if allowed is None else frozenset(allowed)
        self.counters = Counters(COUNTERS)
        self._out_fd = out_fd
        self._status_fd = status_fd
        self._frames: deque[bytes] = deque()
        self._queued_bytes = 0
        self._queue_bytes = int(settings["queue_bytes"])
        self._wake = threading.Condition()        # frames queued, or stopping
        self._state_changed = threading.Event()   # connection state: status now
        self._stopping = False
        self._closing = False
        self._connected = False
        self._subscribed = False
        self._client = None
        self._writer = threading.Thread(target=self._write_loop, name="receiver-writer",
                                        daemon=True)
        self._reporter = threading.Thread(target=self._status_loop, name="receiver-status",
                                          daemon=True)

    def start(self) -> None:
        self._writer.start()
        self._reporter.start()
        client = mqtt_client.make_client(self.mqtt, "source")
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client
        mqtt_client.start(client, self.mqtt)

    def stop(self) -> None:
        self._closing = True  # our own disconnect is not a lost connection
        if self._client is not None:
            mqtt_client.stop(self._client)
        with self._wake:
            self._connected = self._subscribed = False
            self._stopping = True
            self._wake.notify()
        self._writer.join(10)
        self._state_changed.set()
        self._reporter.join(10)

    # --- paho callbacks (network thread) ---------------------------------------
    def _set_state(self, *, connected: bool | None = None, subscribed: bool | None = None):
        if connected is not None:
            self._connected = connected
        if subscribed is not None:
            self._subscribed = subscribed
        self._state_changed.set()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.counters.add("connect_failures")
            log.warning("MQTT broker refused the connection: %s", reason_code)
            self._set_state()
            return
        if self.counters.add("connects") > 0:
            self.counters.add("reconnects")
        self._set_state(connected=True)
        client.subscribe(self.topics.filter, qos=self.qos)  # clean start: every connect

    def _on_connect_fail(self, client, userdata) -> None:
        self.counters.add("connect_failures")
        self._set_state()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if any(rc.is_failure for rc in reason_codes):
            log.error("MQTT broker refused the subscription to %r: %s; check the broker ACL",
                      self.topics.filter, reason_codes)
            return
        self.counters.add("subscribed")
        self._set_state(subscribed=True)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._connected and not self._closing:
            self.counters.add("disconnects")
            log.warning("MQTT connection lost (%s); reconnecting", reason_code)
        self._set_state(connected=False, subscribed=False)

    def _on_message(self, client, userdata, message) -> None:
        received_ns = time.monotonic_ns()
        self.counters.add("received")
        payload = message.payload
        try:
            node, modality = self.topics.parse(message.topic)
            if modality in RESERVED_MODALITIES:
                self.counters.add("ignored")
                return
            if len(payload) > self.max_payload:
                self.counters.add("oversized")
                return
            if self.allowed is not None and modality not in self.allowed:
                raise unknown_modality(modality, self.allowed)
            node_b, modality_b = node.encode(), modality.encode()
        except RejectedPayload as exc:
            self.counters.malformed(exc.reason)
            return
        except UnicodeDecodeError:  # topic that is not UTF-8
            self.counters.malformed(BAD_TOPIC)
            return
        except Exception:  # noqa: BLE001 - an escaping exception would stop paho's thread
            self.counters.malformed("internal_error")
            log.exception("unexpected error on a message on %r; skipped", message.topic)
            return
        frame = b"".join((FRAME.pack(MESSAGE, len(node_b), len(modality_b), len(payload),
                                     received_ns), node_b, modality_b, payload))
        with self._wake:
            while self._frames and self._queued_bytes + len(frame) > self._queue_bytes:
                self._queued_bytes -= len(self._frames.popleft())
                self.counters.add("dropped_queue_full")
            self._frames.append(frame)
            self._queued_bytes += len(frame)
            self._wake.notify()

    # --- writer and status threads ---------------------------------------------
    def _write_loop(self) -> None:
        while True:
            with self._wake:
                if not self._frames and not self._stopping:
                    self._wake.wait()
                batch = list(self._frames)
                self._frames.clear()
                self._queued_bytes = 0
                stopping = self._stopping
            if batch and not self._write(b"".join(batch)):
                return
            if stopping and not batch:
                return

    def _write(self, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._out_fd, view):]
            except BrokenPipeError:
                log.warning("the daemon closed the pipe; %d bytes not delivered", len(view))
                return False
        return True

    def _status_loop(self) -> None:
        last = None
        while True:
            self._state_changed.wait(STATUS_PERIOD_S)
            self._state_changed.clear()
            final = self._stopping and not self._writer.is_alive()
            snap = self.counters.snapshot()
            malformed = snap.pop("malformed")
            snap.pop("malformed_total")
            status = {"counters": snap, "malformed": malformed,
                      "connected": self._connected, "subscribed": self._subscribed}
            if status != last or final:
                line = json.dumps(status).encode() + b"\n"
                if final:
                    os.set_blocking(self._status_fd, True)  # the last word must arrive
                try:
                    # At most PIPE_BUF bytes: written whole or not at all.
                    os.write(self._status_fd, line)
                    last = status
                except BlockingIOError:
                    pass  # the parent is not reading; a newer line follows
                except BrokenPipeError:
                    return
            if final:
                return


def main() -> int:
    # Our input ends when the parent says so (stdin EOF), not on the service's signals.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    line = sys.stdin.buffer.readline(MAX_SETTINGS_BYTES)
    if not line:
        return 0
    settings = json.loads(line)
    logging.basicConfig(level=settings.get("log_level", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Frames go to the original stdout; anything a library might print goes to stderr.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    status_fd = int(settings["status_fd"])
    os.set_blocking(status_fd, False)
    receiver = Receiver(settings, out_fd, status_fd)
    receiver.start()
    while sys.stdin.buffer.read(4096):  # the parent never writes again: wait for EOF
        pass
    receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
