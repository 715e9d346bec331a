"""Both MQTT sources (receiver process and thread) against a real Mosquitto: payload
formats, bad messages, reconnects, auth, TLS. The protocol every live source shares is
checked in test_sources_contract.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgefuse.runtime.service import config
from edgefuse.runtime.core import wire
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.sensors.live.credentials import read_secret
from edgefuse.runtime.core.errors import ConfigError, TransportError
from edgefuse.sensors.live.mqtt_client import MqttSettings
from edgefuse.sensors.live.accounting import BAD_TOPIC, RejectedMessage
from edgefuse.sensors.live.base import Source
from edgefuse.sensors.live.factory import make_mqtt_source
from edgefuse.sensors.live.mqtt_source import MqttSourceSettings, MqttThreadSource, TopicPattern

from tests.conftest import Mosquitto, publish, wait_until


def make_chunk(node="n1", modality="acoustic", seq=0, n=32, channels=1, rate=800.0,
               full_scale=None, integers=False):
    rng = np.random.default_rng(seq)
    x = rng.normal(0, 1000, (n, channels))
    if integers:
        x = np.round(x)
    return Chunk(node, modality, 1_700_000_000_000_000_000 + seq * 10**9, rate,
                 x.astype(np.float32), seq, full_scale=full_scale)


def assert_same_chunk(got: Chunk, want: Chunk) -> None:
    assert (got.node, got.modality, got.t0_ns, got.rate_hz, got.seq, got.full_scale) == \
        (want.node, want.modality, want.t0_ns, want.rate_hz, want.seq, want.full_scale)
    np.testing.assert_array_equal(got.samples, want.samples)


@pytest.fixture(params=["process", "thread"])
def receiver(request) -> str:
    """Every MQTT source test runs with both receivers (sensors.mqtt_process and
    the in-process paho thread): one contract, two transports."""
    return request.param


def source_for(broker: Mosquitto, receiver: str = "process", **kwargs) -> Source:
    mqtt = MqttSettings(host=broker.host, port=broker.port, reconnect_min_s=0.1,
                        reconnect_max_s=1.0, **kwargs.pop("mqtt", {}))
    return make_mqtt_source(MqttSourceSettings(mqtt=mqtt, receiver=receiver, **kwargs))


def read_n(source: Source, n: int, timeout_s: float = 5.0) -> list[Chunk]:
    got: list[Chunk] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got += source.read(0.1)
    assert len(got) == n, f"expected {n} chunks, read {len(got)}; stats {source.stats()}"
    return got


def topic(node, modality):
    return f"edgefuse/{node}/{modality}"


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_json_and_binary_payloads_arrive_as_equal_chunks(broker, protocol, receiver):
    sent = [make_chunk(seq=0), make_chunk(seq=1, integers=True, full_scale=32767.0),
            make_chunk(modality="seismic", seq=2, channels=3, rate=None),
            make_chunk(node="n2", seq=3, integers=True)]
    payloads = [wire.encode_json(sent[0]), wire.encode_binary(sent[1], "<i2"),
                wire.encode_binary(sent[2], "<f4"), wire.encode_json(sent[3])]
    with source_for(broker, receiver, mqtt={"protocol": protocol}) as source:
        assert source.wait_connected(5)
        publish(broker, [(topic(c.node, c.modality), p) for c, p in zip(sent, payloads)])
        got = read_n(source, len(sent))
        stats = source.stats()
    for g, w in zip(got, sent):
        assert_same_chunk(g, w)
    assert stats["decoded"] == len(sent) and stats["malformed_total"] == 0
    assert source.stats()["disconnects"] == 0  # our own close is not a lost connection


def test_malformed_payloads_are_counted_by_reason_and_skipped(broker, receiver):
    good = [make_chunk(seq=i, integers=True) for i in range(4)]
    truncated = wire.encode_binary(make_chunk(seq=90), "<f4")[:-3]
    bad_dtype = bytearray(wire.encode_binary(make_chunk(seq=91), "<f4"))
    bad_dtype[5] = 9
    nan_json = json.dumps({"t0_ns": 5, "rate_hz": 800.0, "seq": 7,
                           "values": [float("nan"), float("inf"), 1.0]}).encode()
    nan_chunk = Chunk("n1", "acoustic", 6, 800.0, np.array([[np.nan], [-np.inf]], np.float32), 8)
    items = [
        (topic("n1", "acoustic"), wire.encode_json(good[0])),
        (topic("n1", "acoustic"), b"{not json"),                                 # bad_json
        (topic("n1", "acoustic"), bytes(bad_dtype)),                             # bad_dtype
        (topic("n1", "acoustic"), truncated),                                    # truncated
        (topic("n1", "acoustic"), wire.MAGIC + b"\x01\x02"),                     # truncated
        (topic("n1", "acoustic"), b"x" * 70_000),                                # oversized
        # 2 channels: decoded and delivered; the channel count is the aligner's check
        (topic("n1", "acoustic"), wire.encode_json(make_chunk(seq=92, channels=2))),
        (topic("n1", "thermal"), wire.encode_json(make_chunk(seq=93))),          # not subscribed
        (topic("n1", "acoustic"), b'{"t0_ns": 1, "seq": 1}'),                    # bad_fields
        (topic("n1", "acoustic"), b"[" * 50_000 + b"]" * 50_000 + b""),          # oversized
        (topic("n1", "acoustic"), b"[" * 20_000),                                # bad_json (deep)
        (topic("n1", "acoustic"), b'{"t0_ns":1,"seq":1,"values":[1' + b"0" * 400 + b"]}"),
        (topic("n1", "decisions"), b'{"node":"n1"}'),                            # not subscribed
        (topic("n1", "acoustic"), nan_json),                                     # decodes
        (topic("n1", "acoustic"), wire.encode_binary(nan_chunk, "<f4")),         # decodes
        *[(topic("n1", "acoustic"), wire.encode_binary(c, "<i2")) for c in good[1:]],
    ]
    with source_for(broker, receiver, allowed_modalities=("acoustic", "seismic"),
                    max_payload_bytes=64_000) as source:
        assert source.wait_connected(5)
        publish(broker, items)
        # The subscription names the allowed modalities (edgefuse/+/acoustic, .../seismic):
        # "thermal" and our own "decisions" are never delivered, so never counted.
        wait_until(lambda: source.stats()["received"] == len(items) - 2, 5, "all messages")
        got = read_n(source, 7)
        stats = source.stats()
    assert stats["malformed"] == {"bad_json": 2, "bad_dtype": 1, "truncated": 2,
                                  "bad_fields": 2}
    assert stats["oversized"] == 2 and stats["ignored"] == 0
    assert stats["received"] == len(items) - 2
    assert stats["decoded"] == 7 and stats["dropped_queue_full"] == 0
    assert [c.seq for c in got] == [0, 92, 7, 8, 1, 2, 3]
    assert got[1].channels == 2
    got = [got[0], *got[2:]]
    assert np.isnan(got[1].samples[0, 0]) and np.isinf(got[1].samples[1, 0])
    assert np.isnan(got[2].samples[0, 0]) and got[2].samples[1, 0] == -np.inf
    for g, w in zip([got[0], *got[3:]], good):
        assert_same_chunk(g, w)


def test_full_queue_drops_the_oldest_and_counts(broker):
    sent = [make_chunk(seq=i) for i in range(7)]
    with source_for(broker, "thread", queue_max=3) as source:
        assert source.wait_connected(5)
        publish(broker, [(topic("n1", "acoustic"), wire.encode_binary(c)) for c in sent])
        wait_until(lambda: source.stats()["decoded"] == 7, 5, "7 decoded chunks")
        got = source.read(0.5)
        stats = source.stats()
    assert [c.seq for c in got] == [4, 5, 6]
    assert stats["dropped_queue_full"] == 4 and stats["delivered"] == 3


def test_process_receiver_pushes_back_instead_of_dropping(broker):
    """The process receiver decodes only while its queue has room; the rest waits in
    the pipe, so a slow consumer loses nothing that memory can hold."""
    sent = [make_chunk(seq=i) for i in range(7)]
    with source_for(broker, "process", queue_max=3) as source:
        assert source.wait_connected(5)
        publish(broker, [(topic("n1", "acoustic"), wire.encode_binary(c)) for c in sent])
        wait_until(lambda: source.stats()["received"] == 7, 5, "7 received messages")
        stats = source.stats()
        assert stats["queued"] == 3 and stats["decoded"] == 3
        got = read_n(source, 7)
        stats = source.stats()
    assert [c.seq for c in got] == list(range(7))
    assert stats["dropped_queue_full"] == 0 and stats["delivered"] == 7


def _drain(source) -> list[Chunk]:
    got: list[Chunk] = []
    while chunks := source.read(0.5):
        got += chunks
    return got


def test_process_receiver_drops_the_oldest_when_its_bytes_are_full(broker):
    """Nobody reads: the pipe and the child's deque (64 KiB each here) fill up; the
    child drops the oldest frames, counts them, and the newest get through."""
    sent = [make_chunk(seq=i, n=12_000) for i in range(12)]  # 48 KB each
    with source_for(broker, "process", queue_max=1, receiver_queue_bytes=1 << 16) as source:
        assert source.wait_connected(5)
        publish(broker, [(topic("n1", "acoustic"), wire.encode_binary(c)) for c in sent])
        time.sleep(1.0)  # everything reaches the child; nobody reads (nor pumps the pipe)
        got = _drain(source)
        wait_until(lambda: source.stats()["received"] == 12, 5, "12 received messages")
        got += _drain(source)  # a slow machine: whatever came after the first drain
        stats = source.stats()
    seqs = [c.seq for c in got]
    assert stats["dropped_queue_full"] >= 1
    assert stats["decoded"] + stats["dropped_queue_full"] == 12 == len(got) + \
        stats["dropped_queue_full"]
    assert seqs == sorted(seqs) and seqs[-1] == 11


@pytest.mark.slow
def test_reconnects_and_resubscribes_after_broker_restart(broker, receiver):
    with source_for(broker, receiver) as source:
        assert source.wait_connected(5)
        publish(broker, [(topic("n1", "acoustic"), wire.encode_json(make_chunk(seq=0)))])
        assert [c.seq for c in read_n(source, 1)] == [0]
        broker.stop()
        wait_until(lambda: not source.wait_connected(0), 5,
                   "the source to notice the broker is gone")
        time.sleep(2.0)  # broker down for a while: several reconnect attempts fail
        broker.start()
        wait_until(lambda: source.stats()["subscribed"] >= 2, 10, "re-subscription")
        publish(broker, [(topic("n1", "acoustic"), wire.encode_json(make_chunk(seq=c)))
                         for c in (1, 2)])
        assert [c.seq for c in read_n(source, 2)] == [1, 2]
        stats = source.stats()
    assert stats["reconnects"] >= 1 and stats["disconnects"] >= 1
    assert stats["connect_failures"] >= 1


def test_read_before_open_raises():
    source = MqttThreadSource()
    with pytest.raises(TransportError, match="before open"):
        source.read(0)


def test_topic_pattern():
    p = TopicPattern("site/+/{modality}/dev/{node}")
    assert p.filter == "site/+/+/dev/+"
    assert p.parse("site/a/imu/dev/watch1") == ("watch1", "imu")
    with pytest.raises(RejectedMessage) as info:
        p.parse("site/a/imu/dev/watch1/extra")
    assert info.value.reason == BAD_TOPIC
    for bad in ("edgefuse/{node}", "edgefuse/#/{node}/{modality}", "a/{node}x/{modality}",
                "a//{node}/{modality}"):
        with pytest.raises(ConfigError):
            TopicPattern(bad)
    assert TopicPattern("edgefuse/{node}/{modality}").topic("n", "m") == "edgefuse/n/m"


def test_settings_refuse_unknown_keys():
    with pytest.raises(ConfigError, match=r"\[source.mqtt.mqtt\]: unknown key\(s\) \['hots'\]"):
        config.from_dict({"source": {"mqtt": {"mqtt": {"hots": "x"}}}})
    with pytest.raises(ConfigError, match="protocol"):
        MqttSettings(protocol="3")
    s = config.from_dict({"source": {"mqtt": {"mqtt": {"port": 1884},
                                              "allowed_modalities": ["imu"]}}}).source.mqtt
    assert s.mqtt.port == 1884 and s.allowed_modalities == ("imu",)


# --- the receiver process (receiver = "process") ------------------------------------
def test_receiver_process_survives_sigterm_and_is_restarted_after_sigkill(broker):
    """systemd signals the whole cgroup: the child must wait for its parent's word;
    a child that dies anyway is restarted and its counts are kept."""
    with source_for(broker, "process") as source:
        assert source.wait_connected(5)
        publish(broker, [(topic("n1", "acoustic"), wire.encode_binary(make_chunk(seq=0)))])
        assert [c.seq for c in read_n(source, 1)] == [0]
        child = source._proc
        os.kill(child.pid, signal.SIGTERM)
        time.sleep(0.3)
        assert child.poll() is None, "the receiver must ignore SIGTERM"
        os.kill(child.pid, signal.SIGKILL)
        # read() is what moves a thread-less source along (the daemon calls it every loop)
        wait_until(lambda: not source.read(0.05) and source.stats()["receiver_starts"] == 2, 5,
                   "a restarted receiver")
        assert source.wait_connected(5)
        assert source._proc is not child
        publish(broker, [(topic("n1", "acoustic"), wire.encode_binary(make_chunk(seq=1)))])
        assert [c.seq for c in read_n(source, 1)] == [1]
        wait_until(lambda: source.stats()["received"] == 2, 2, "both messages counted")
        stats = source.stats()
    assert stats["decoded"] == 2 and stats["disconnects"] == 1 and stats["connects"] == 2


def _pid_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # exited; a zombie waits only for init to reap it


def test_receiver_process_exits_when_its_parent_is_killed(broker):
    script = ("import sys, time\n"
              "from edgefuse.sensors.live.mqtt_client import MqttSettings\n"
              "from edgefuse.sensors.live.mqtt_source import MqttSourceSettings\n"
              "from edgefuse.sensors.live.factory import make_mqtt_source\n"
              "s = make_mqtt_source(MqttSourceSettings(mqtt=MqttSettings(host=sys.argv[1], "
              "port=int(sys.argv[2]))))\n"
              "s.open(); assert s.wait_connected(5)\n"
              "print(s._proc.pid, flush=True); time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script, broker.host, str(broker.port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        assert not _pid_gone(child_pid)
    finally:
        parent.kill()
        parent.wait(5)
    wait_until(lambda: _pid_gone(child_pid), 5, "the orphaned receiver to exit")


def test_receiver_process_imports_no_numpy():
    """The child stays small: standard library and paho only."""
    out = subprocess.run(
        [sys.executable, "-c", "import sys, edgefuse.sensors.live.mqtt_receiver; "
         "print(sorted(m for m in ('numpy', 'numba', 'onnxruntime') if m in sys.modules))"],
        capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_receiver_setting_is_validated():
    with pytest.raises(ConfigError, match="receiver must be one of"):
        MqttSourceSettings(receiver="fork")


# --- credentials, auth, TLS ----------------------------------------------------
def test_read_secret_from_file_and_systemd_credential(tmp_path, monkeypatch):
    (tmp_path / "pw").write_text("s3cret\n")
    assert read_secret(str(tmp_path / "pw")) == "s3cret"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_secret("credential:pw") == "s3cret"
    for bad in ("credential:missing", "credential:../pw", str(tmp_path / "nope")):
        with pytest.raises(ConfigError):
            read_secret(bad)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY"):
        read_secret("credential:pw")


def test_password_from_systemd_credential(tmp_path, monkeypatch, receiver):
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "edge", "pa55word"],
                   check=True, capture_output=True)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("pa55word\n")
    (creds / "wrong").write_text("nope\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    b = Mosquitto(tmp_path / "auth", listener_conf=("allow_anonymous false",
                                                    f"password_file {pwfile}"))
    b.start()
    try:
        with source_for(b, receiver, mqtt={"username": "edge",
                                           "password_secret": "credential:wrong"}) as bad:
            wait_until(lambda: bad.stats()["connect_failures"] >= 1, 5, "a refused connect")
            assert not bad.wait_connected(0)
        with source_for(b, receiver, mqtt={"username": "edge",
                                 "password_secret": "credential:mqtt-password"}) as good:
            assert good.wait_connected(5)
            want = make_chunk(seq=5)
            client_items = [(topic("n1", "acoustic"), wire.encode_json(want))]
            publish(b, client_items, configure=lambda c: c.username_pw_set("edge", "pa55word"))
            assert_same_chunk(read_n(good, 1)[0], want)
    finally:
        b.stop(kill=True)


def _make_pki(d):
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=edgefuse-test-ca")
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "")):
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        ext = d / f"{name}.ext"
        ext.write_text(extra + "\n" if extra else "basicConstraints=CA:FALSE\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", str(ext))


def test_mutual_tls(tmp_path, receiver):
    pki = tmp_path / "pki"
    pki.mkdir()
    _make_pki(pki)
    b = Mosquitto(tmp_path / "tls", listener_conf=(
        "allow_anonymous true", f"cafile {pki / 'ca.crt'}", f"certfile {pki / 'server.crt'}",
        f"keyfile {pki / 'server.key'}", "require_certificate true"))
    b.start()
    try:
        tls = {"tls_ca_file": str(pki / "ca.crt"), "tls_cert_file": str(pki / "client.crt"),
               "tls_key_file": str(pki / "client.key")}
        with source_for(b, receiver, mqtt=tls) as source:
            assert source.wait_connected(5), source.stats()
            want = make_chunk(seq=9)
            publish(b, [(topic("n1", "acoustic"), wire.encode_binary(want))],
                    configure=_client_tls(pki))
            assert_same_chunk(read_n(source, 1)[0], want)
    finally:
        b.stop(kill=True)


def _client_tls(pki):
    import ssl
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    return lambda client: client.tls_set_context(ctx)
