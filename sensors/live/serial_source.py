"""Chunks from a serial port (pyserial): JSON lines, CSV lines or binary frames.

The protocols are parsed by the pure classes of serial_framing and
serial_csv; ``PROTOCOLS`` below is the one table of them (name -> parser,
sender-side encoder). A reader thread owns the port: it opens it (exclusive
lock, so two readers cannot split the byte stream), reads what is there,
feeds the parser and enqueues chunks. When the device goes away (SerialException/OSError: unplugged,
socat gone) the thread closes the port, counts a disconnect, drops the
partial frame (counted ``truncated``) and retries opening with a capped
exponential backoff (runtime.core.backoff: ``reopen_min_s`` doubling up to
``reopen_max_s``) until close(). Bad data never stops the thread.

Every refused line or frame is counted by reason in stats()["malformed"]
(``oversized`` on its own, as for MQTT) and warned about with the port and
the reason named, rate-limited per (port, reason): the first at once, then
at most one line a minute saying how many occurred since. A binary frame
whose header announces more than ``max_frame_bytes`` is refused at the
header; one that started but stalls is dropped after ``frame_timeout_s``
plus its transfer time at ``baud`` (``frame_timeout``).

``device`` is a path or a pyserial URL (``loop://``, ``socket://host:port``,
``rfc2217://...``): ports are opened with ``serial.serial_for_url``.

Prefer stable device paths (/dev/serial/by-id/usb-...): /dev/ttyUSB0 may
name a different adapter after a replug.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import serial

from edgefuse.runtime.core.backoff import Backoff
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import ConfigError
from edgefuse.runtime.core.ratelimit import WarnLimiter
from edgefuse.sensors.live import serial_framing
from edgefuse.sensors.live.accounting import OVERSIZED
from edgefuse.sensors.live.base import DEFAULT_QUEUE_MAX, ClockCheck, Source
from edgefuse.sensors.live.serial_csv import CsvLineParser, encode_csv_lines
from edgefuse.sensors.live.serial_framing import (
    BinaryFrameParser, JsonLineParser, encode_chunk_frame, encode_json_line,
)

log = logging.getLogger(__name__)

READ_MAX = 4096  # bytes per read() call: bounds the work between stop checks


@dataclass(frozen=True)
class Protocol:
    """One serial protocol: how a receiver parses it, how a sender encodes it."""

    parser: type[JsonLineParser] | type[CsvLineParser] | type[BinaryFrameParser]
    # (chunk, dtype of a binary payload, e.g. "<i2") -> the bytes on the line; the
    # line protocols write numbers as text and ignore the dtype
    encode: Callable[[Chunk, str], bytes]


# The one table of the serial protocols: the settings check names against it, the
# source builds its parser from it, `edgefuse simulate` encodes with it.
PROTOCOLS: dict[str, Protocol] = {
    "json": Protocol(JsonLineParser, lambda chunk, dtype: encode_json_line(chunk)),
    "csv": Protocol(CsvLineParser, lambda chunk, dtype: encode_csv_lines(chunk)),
    "binary": Protocol(BinaryFrameParser, encode_chunk_frame),
}


@dataclass(frozen=True)
class SerialSettings:
    device: str
    protocol: str = "json"              # "json" | "csv" | "binary"
    baud: int = 115200
    exclusive: bool = True
    read_timeout_s: float = 0.1
    node: str | None = None             # required for csv (the lines carry no node)
    csv_group_samples: int = 64
    csv_max_gap_ns: int | None = None
    csv_rate_hz: Mapping[str, float] | None = None
    idle_flush_s: float = 0.25          # csv: emit held-back samples after this much silence
    max_line_bytes: int = serial_framing.DEFAULT_MAX_LINE
    max_frame_bytes: int = serial_framing.DEFAULT_MAX_FRAME  # whole binary frame, 64 KiB
    frame_timeout_s: float = 1.0        # binary: a started frame must complete in this + transfer
    reopen_min_s: float = 0.2
    reopen_max_s: float = 5.0
    allowed_modalities: tuple[str, ...] | None = None
    queue_max: int = DEFAULT_QUEUE_MAX

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"serial protocol must be one of {tuple(PROTOCOLS)}, found "
                              f"{self.protocol!r}")
        if self.protocol == "csv" and not self.node:
            raise ConfigError("serial protocol 'csv' needs node = '<name>' (CSV lines carry none)")
        if not 50 <= self.baud <= 16_000_000:
            raise ConfigError(f"serial baud must be 50..16000000, found {self.baud!r}")
        if not 0.01 <= self.read_timeout_s <= 5:
            raise ConfigError(f"read_timeout_s must be 0.01..5 s, found {self.read_timeout_s!r}")
        lo, hi = serial_framing.MIN_BUFFER, serial_framing.MAX_FRAME_LIMIT
        for key in ("max_line_bytes", "max_frame_bytes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ConfigError(f"{key} must be an integer {lo}..{hi} (bytes), found {value!r}")
        if not 0.05 <= self.frame_timeout_s <= 600:
            raise ConfigError(f"frame_timeout_s must be 0.05..600 s, found "
                              f"{self.frame_timeout_s!r}")
        if not 0 < self.reopen_min_s <= self.reopen_max_s <= 600:
            raise ConfigError("reopen delays must satisfy 0 < reopen_min_s <= reopen_max_s <= "
                              f"600, found {self.reopen_min_s!r}, {self.reopen_max_s!r}")
        if self.device.startswith("/dev/tty") and "USB" in self.device:
            log.info("serial device %s may be renamed on replug; prefer /dev/serial/by-id/...",
                     self.device)


class SerialSource(Source):
    """Chunks from one serial port (module docstring); name ``serial:<device>``."""

    COUNTERS = Source.COUNTERS + ("open_failures", "bytes")

    def __init__(self, settings: SerialSettings, *,
                 modalities: Iterable[str] | None = None,
                 warn_limiter: WarnLimiter | None = None,
                 clock_check: ClockCheck | None = None):
        """modalities: the model's modalities, the ones a line may carry unless the
        settings' allowed_modalities say otherwise (None with neither: any). A serial
        line carries any modality name, so the ones the model has no use for are
        refused here, named ("Acoustic": did you mean 'acoustic'?), as MQTT's
        per-modality subscriptions never receive them.
        warn_limiter: rate-limits this source's warnings (tests inject a clock);
        clock_check: compare t0 with the receipt time (sensors.live.base.ClockCheck)."""
        self.settings = settings
        super().__init__(f"serial:{settings.device}", settings.queue_max, clock_check)
        self._warner = warn_limiter or WarnLimiter(log)
        allowed = settings.allowed_modalities or modalities
        self.parser = PROTOCOLS[settings.protocol].parser.from_settings(settings, allowed)
        self._parser_lock = threading.Lock()  # stats() reads parser counters from other threads
        self._stop = threading.Event()
        self._port_open = threading.Event()
        self._thread: threading.Thread | None = None

    def _transport_up(self) -> bool:
        return self._port_open.is_set()

    @property
    def alive(self) -> bool:
        thread = self._thread
        return thread is None or thread.is_alive()

    def open(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._opened = True
        self._thread = threading.Thread(target=self._run, name=f"serial-{self.settings.device}",
                                        daemon=True)
        self._thread.start()

    def wait_connected(self, timeout_s: float) -> bool:
        """True once the port is open."""
        return self._port_open.wait(max(0.0, timeout_s))

    def close(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("serial reader of %s did not stop within %.1f s",
                            self.settings.device, timeout_s)

    def stats(self) -> dict:
        """Flat counters (numbers), plus ``malformed``: reason -> count.

        Serial adds ``bytes``, ``skipped_bytes``, ``open_failures`` and, for CSV,
        ``csv_flushes_<why>`` (why chunks were cut: size, modality, gap, ...).
        """
        snap = super().stats()
        with self._parser_lock:
            parsed = self.parser.stats()
        for reason, n in parsed.pop("malformed").items():
            snap["malformed"][reason] = snap["malformed"].get(reason, 0) + n
        snap.update(parsed)
        snap[OVERSIZED] += snap["malformed"].pop(OVERSIZED, 0)
        snap["malformed_total"] = sum(snap["malformed"].values())
        # a serial "message" is a line or frame: the good ones plus the refused ones
        snap["received"] = snap["decoded"] + snap["malformed_total"] + snap["oversized"]
        return snap

    # --- reader thread ---------------------------------------------------
    def _run(self) -> None:
        reopen = Backoff(self.settings.reopen_min_s, self.settings.reopen_max_s)
        port: serial.Serial | None = None
        while not self._stop.is_set():
            if port is None:
                port = self._try_open()
                if port is None:
                    self._stop.wait(reopen.next())
                    continue
                reopen.reset()
            try:
                data = port.read(min(max(port.in_waiting, 1), READ_MAX))
            except (serial.SerialException, OSError) as exc:
                self._last_error = f"{self.settings.device} failed: {exc}"
                self._warner.warn((self.settings.device, "disconnect"),
                                  "serial device %s failed (%s); reopening", self.settings.device,
                                  exc)
                self._counters.add("disconnects")
                self._port_open.clear()
                self._close_port(port)
                port = None
                self._deliver(self.parser.reset)
                continue
            self._handle(data)
        if port is not None:
            self._close_port(port)
        self._port_open.clear()
        self._deliver(self.parser.reset)

    def _try_open(self) -> serial.Serial | None:
        s = self.settings
        try:
            # serial_for_url: a plain path opens serial.Serial; loop:// etc. work too
            port = serial.serial_for_url(s.device, s.baud, timeout=s.read_timeout_s,
                                         exclusive=s.exclusive)
        except (serial.SerialException, OSError, ValueError) as exc:
            self._counters.add("open_failures")
            self._last_error = f"cannot open {s.device}: {exc}"
            self._warner.warn((s.device, "open_failed"),
                              "cannot open serial device %s (%s); retrying every %.1f s at most",
                              s.device, exc, s.reopen_max_s)
            return None
        self._last_error = None
        if self._counters.add("connects") > 0:
            self._counters.add("reconnects")
        log.info("serial device %s open (%d baud, %s)", s.device, s.baud, s.protocol)
        self._port_open.set()
        self._last_data = time.monotonic()
        return port

    @staticmethod
    def _close_port(port: serial.Serial) -> None:
        try:
            port.close()
        except (serial.SerialException, OSError):
            pass  # already gone; nothing left to release

    def _handle(self, data: bytes) -> None:
        now = time.monotonic()
        if data:
            self._counters.add("bytes", len(data))
            self._last_data = now
            self._deliver(lambda: self.parser.feed(data))
        elif now - self._last_data >= self.settings.idle_flush_s:
            self._deliver(self.parser.idle)  # CSV emits the samples it held back
            self._last_data = now
        # after every read, data or not (reads return empty every read_timeout_s):
        # a binary frame that stalled is dropped here
        self._deliver(lambda: self.parser.poll(now))

    def _deliver(self, produce) -> None:
        try:
            with self._parser_lock:
                chunks = produce()
                news = self.parser.take_stream_news()
        except Exception:  # noqa: BLE001 - the parsers are fuzzed not to raise; never die anyway
            self._counters.malformed("internal_error")
            log.exception("serial parser failed on data from %s; data skipped",
                          self.settings.device)
            return
        self._warn(news)
        for chunk in chunks:
            self._offer(chunk)  # counts it decoded (or refuses its clock)

    def origin(self, node: str, modality: str) -> dict[str, str]:
        return {"port": self.settings.device}

    def _warn(self, news: Mapping[tuple, tuple[int, str]]) -> None:
        """One rate-limited warning per (port, node, modality, reason); every occurrence
        is counted by the limiter (bounded: a read of READ_MAX bytes holds at most that
        many errors). Node and modality are named where the line or frame named them."""
        device, protocol = self.settings.device, self.settings.protocol
        for (reason, node, modality), (n, detail) in news.items():
            sender = (f" from node {node!r}, modality {modality!r}" if node and modality
                      else "")
            for _ in range(n):
                self._warner.warn((device, node, modality, reason),
                                  "serial %s (%s): skipped (%s)%s: found %s; counted by reason "
                                  "in the source's stats", device, protocol, reason, sender,
                                  detail)
