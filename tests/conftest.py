"""Shared fixtures: a real Mosquitto broker, pty pairs, socat links, MQTT helpers.

The broker runs ``mosquitto -c <conf>`` in a temp dir on a free port found by
binding port 0; ``stop()``/``start()`` keep the port so clients can reconnect.
"""
from __future__ import annotations

import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # see edgefuse/runtime/__init__.py

import pty  # noqa: E402
import shutil
import signal
import socket
import subprocess
import threading
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
SOCAT = shutil.which("socat")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_process(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Send sig to a running process, wait 5 s for it, then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str,
               interval_s: float = 0.02) -> object:
    """Poll until predicate() is truthy; fail the test saying what never happened."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class Mosquitto:
    """A real broker on 127.0.0.1:<port>; persistence optional (for session tests).

    listener_conf: lines after the ``listener`` line (auth, TLS); anonymous by default.
    """

    def __init__(self, workdir: Path, port: int | None = None, persistence: bool = False,
                 listener_conf: tuple[str, ...] = ("allow_anonymous true",)):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.conf = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        lines = [f"listener {self.port} {self.host}", *listener_conf,
                 f"persistence {'true' if persistence else 'false'}",
                 "log_dest stderr", "log_type error", "log_type warning", "log_type notice"]
        if persistence:
            lines += [f"persistence_location {self.workdir}/", "autosave_interval 0"]
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to a user that cannot write here
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 5.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto did not listen on {self.port} within "
                                       f"{timeout_s} s") from None
                time.sleep(0.02)

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (saves persistence) or SIGKILL; waits for exit."""
        if self.proc is None:
            return
        end_process(self.proc, signal.SIGKILL if kill else signal.SIGTERM)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def broker(tmp_path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path / "broker")
    b.start()
    yield b
    b.stop(kill=True)


@pytest.fixture
def persistent_broker(tmp_path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path / "pbroker", persistence=True)
    b.start()
    yield b
    b.stop(kill=True)


class Collector:
    """A plain paho subscriber collecting (topic, payload) pairs.

    session=True: persistent MQTT 5 session (clean_start False, long expiry),
    so messages published while it is disconnected wait for it on the broker.
    """

    def __init__(self, broker: Mosquitto, topic: str, *, qos: int = 1, session: bool = False,
                 client_id: str | None = None):
        from paho.mqtt.properties import Properties
        from paho.mqtt.packettypes import PacketTypes

        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.topic, self.qos = topic, qos
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"collector-{os.getpid()}-{id(self)}",
                                  protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        props = None
        if session:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        self.client.connect_async(broker.host, broker.port, 30, clean_start=not session,
                                  properties=props)
        self.client.loop_start()
        assert self._subscribed.wait(5), "collector could not subscribe"

    def _on_connect(self, client, userdata, flags, rc, props):
        if not rc.is_failure:
            client.subscribe(self.topic, qos=self.qos)

    def _on_message(self, client, userdata, msg):
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [p for _, p in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish(broker: Mosquitto, items: list[tuple[str, bytes]], qos: int = 1, *,
            configure: Callable[[mqtt.Client], object] | None = None) -> None:
    """Publish items in order and wait until all are sent (QoS 1: acknowledged).

    configure(client) runs before connecting (credentials, TLS)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if configure is not None:
        configure(client)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=qos) for topic, payload in items]
        for info in infos:
            info.wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


# --- serial peers -----------------------------------------------------------
class PtyPair:
    """pty.openpty(): write to ``master``, open ``path`` (the slave) with pyserial."""

    def __init__(self):
        self.master, self._slave = pty.openpty()
        tty.setraw(self._slave)  # no echo/line editing before pyserial configures it
        self.path = os.ttyname(self._slave)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view):]

    def close(self) -> None:
        for fd in (self.master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def pty_pair() -> Iterator[PtyPair]:
    pair = PtyPair()
    yield pair
    pair.close()


class SocatLink:
    """Two linked ptys with stable symlinks: the source opens ``device``, tests write
    to ``peer``. stop() removes both (an unplug); start() makes new ones at the same paths."""

    def __init__(self, workdir: Path):
        self.device = str(Path(workdir) / "ttyEDGE0")
        self.peer = str(Path(workdir) / "ttyEDGE1")
        self.proc: subprocess.Popen | None = None
        self._fd: int | None = None

    def start(self, timeout_s: float = 5.0) -> None:
        for p in (self.device, self.peer):
            if os.path.lexists(p):
                os.unlink(p)
        self.proc = subprocess.Popen(
            [SOCAT, "-d", f"pty,raw,echo=0,link={self.device}",
             f"pty,raw,echo=0,link={self.peer}"], stderr=subprocess.DEVNULL)
        wait_until(lambda: os.path.exists(self.device) and os.path.exists(self.peer),
                   timeout_s, "socat pty links")
        self._fd = os.open(self.peer, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self._fd)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def stop(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.proc is not None:
            end_process(self.proc)
            self.proc = None


@pytest.fixture
def socat_link(tmp_path) -> Iterator[SocatLink]:
    if SOCAT is None:
        pytest.skip("socat is not installed")
    link = SocatLink(tmp_path)
    link.start()
    yield link
    link.stop()
