"""The MQTT receiver process: paho's network loop, away from the daemon's GIL.

``MqttProcessSource`` (sensors.live.mqtt_process; ``receiver = "process"``,
the default) runs ``python -m edgefuse.sensors.live.mqtt_receiver`` as a
child. paho parses MQTT packets in pure Python; at a few thousand messages
a second that parsing, sharing one GIL with the aligner and ONNX Runtime,
was the largest single cost in the daemon (a third of its busy time at 200
nodes). Here it runs on another core, and the daemon reads ready-made frames
from a pipe.

The child runs the same ``Subscriber`` (sensors.live.mqtt_subscriber) as the
in-process source, with its checks (topic, reserved modality, size before
any parsing, allowed modality: the MQTT path's only ones), and forwards each
surviving payload untouched; the parent decodes it with the same
``base.decode_payload``, so both receivers count the same reasons. This
module imports the standard library and paho only (no numpy): the child
costs about 22 MB of memory.

Protocol, no pickle:

- parent -> child, stdin: one JSON line of settings, then nothing. EOF (the
  parent closed the pipe, or died) means: disconnect, flush, exit 0.
- child -> parent, stdout (the data pipe): frames of ``FRAME`` (20 bytes,
  little-endian: kind u8 = MESSAGE, pad, node length u16, modality length
  u16, pad, payload length u32, received CLOCK_MONOTONIC ns i64), then node
  and modality (UTF-8), then the payload as received.
- child -> parent, the status pipe (file descriptor ``status_fd`` of the
  settings): JSON lines ``{"counters": {...}, "malformed": {...},
  "connected": bool, "subscribed": bool, "last_error": str | null}`` (why the
  last connection attempt failed), on every connection change and at
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
import select
import signal
import struct
import sys
import threading
from collections import deque

from edgefuse.sensors.live import mqtt_client
from edgefuse.sensors.live import mqtt_subscriber
from edgefuse.sensors.live.accounting import Counters
from edgefuse.sensors.live.mqtt_subscriber import Subscriber
from edgefuse.sensors.live.topics import Partition, TopicPattern

log = logging.getLogger("edgefuse.sensors.live.mqtt_receiver")

FRAME = struct.Struct("<BxHHxxIq")
MESSAGE = 1
STATUS_PERIOD_S = 0.1
ALIVE_CHECK_S = 1.0
MAX_SETTINGS_BYTES = 1 << 16
MAX_ERROR_CHARS = 1000
COUNTERS = mqtt_subscriber.COUNTERS + ("dropped_queue_full",)


class Receiver:
    """Subscriber + bounded frame deque + writer and status threads."""

    def __init__(self, settings: dict, out_fd: int, status_fd: int):
        self.counters = Counters(COUNTERS)
        self.subscriber = Subscriber(
            mqtt_client.MqttSettings(**settings["mqtt"]),  # asdict() of a checked one
            TopicPattern(settings["topic_pattern"], _partition(settings.get("partition"))),
            qos=int(settings["qos"]),
            max_payload=int(settings["max_payload_bytes"]),
            allowed=settings.get("allowed_modalities"), counters=self.counters,
            deliver=self._enqueue, on_state=self._on_state, filters=settings.get("filters"),
            session_expiry_s=int(settings.get("session_expiry_s", 0)))
        self._out_fd = out_fd
        self._status_fd = status_fd
        self._frames: deque[bytes] = deque()
        self._queued_bytes = 0
        self._queue_bytes = int(settings["queue_bytes"])
        self._wake = threading.Condition()        # frames queued, or stopping
        self._state_changed = threading.Event()   # connection state: status now
        self._stopping = False
        self._writer = threading.Thread(target=self._write_loop, name="receiver-writer",
                                        daemon=True)
        self._reporter = threading.Thread(target=self._status_loop, name="receiver-status",
                                          daemon=True)

    def start(self) -> None:
        self._writer.start()
        self._reporter.start()
        self.subscriber.start()

    def stop(self) -> None:
        self.subscriber.stop()
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._writer.join(10)
        self._state_changed.set()
        self._reporter.join(10)

    # --- from the subscriber (paho's network thread) ------------------------------
    def _on_state(self) -> None:
        self._state_changed.set()

    def _enqueue(self, node: str, modality: str, payload: bytes, received_ns: int) -> None:
        node_b, modality_b = node.encode(), modality.encode()
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
            snap = self.counters.stats()
            malformed = snap.pop("malformed")
            snap.pop("malformed_total")
            status = {"counters": snap, "malformed": malformed,
                      "connected": self.subscriber.connected,
                      "subscribed": self.subscriber.subscribed,
                      # bounded: a status line must fit in PIPE_BUF to be written whole
                      "last_error": (self.subscriber.last_error or "")[:MAX_ERROR_CHARS] or None}
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


def _partition(text: str | None) -> Partition | None:
    return Partition.parse(text) if text else None


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
    stdin = sys.stdin.buffer.fileno()
    while True:  # the parent never writes again: wait for EOF, watching paho's thread
        if select.select([stdin], [], [], ALIVE_CHECK_S)[0] and not os.read(stdin, 4096):
            break
        if not receiver.subscriber.alive:
            log.error("paho's network thread died; exiting so that the daemon starts a "
                      "new receiver")
            return 3
    receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
