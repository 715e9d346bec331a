"""MQTT connections say what failed: real Mosquitto brokers (TLS and plain) on ephemeral
ports, certificates made with the openssl CLI. Also: one client id per connection, the
reconnect cap, a persistent session holding QoS 1 chunks, a subscription that never
delivers our own decisions, and rate-limited rejection warnings that name the topic."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from edgefuse.runtime.core import wire
from edgefuse.runtime.core.errors import ConfigError
from edgefuse.sensors.live.mqtt_client import MqttSettings
from edgefuse.sensors.live.accounting import (
    Counters, RejectedMessage, RejectionLog, count_rejection,
)
from edgefuse.sensors.live.factory import make_mqtt_source
from edgefuse.sensors.live.mqtt_source import MqttSourceSettings

from tests.conftest import Mosquitto, free_port, publish, wait_until
from tests.test_mqtt_source import make_chunk, read_n, topic

RECEIVERS = ["process", "thread"]


# --- certificates -------------------------------------------------------------------
def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=cwd)


def _key_and_csr(d: Path, name: str) -> None:
    _openssl(d, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")


def _ca(d: Path, name: str) -> None:
    _openssl(d, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
             "-subj", f"/CN=edgefuse {name}")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.crt signs server.crt (IP 127.0.0.1 only: 'localhost' mismatches), client.crt and
    expired.crt (valid in January 2020 only); other-ca.crt signs nothing of ours."""
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other-ca")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"),
                      ("client", "basicConstraints=CA:FALSE")):
        _key_and_csr(d, name)
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
                 "-extfile", f"{name}.ext")
    # `openssl x509` cannot backdate; `openssl ca` can (-startdate/-enddate).
    _key_and_csr(d, "expired")
    (d / "index.txt").write_text("")
    (d / "serial").write_text("1000\n")
    (d / "ca.cnf").write_text(
        "[ca]\ndefault_ca = edge\n[edge]\ndatabase = index.txt\nnew_certs_dir = .\n"
        "certificate = ca.crt\nprivate_key = ca.key\ndefault_md = sha256\npolicy = any\n"
        "serial = serial\nx509_extensions = ext\n[any]\ncommonName = supplied\n"
        "[ext]\nsubjectAltName = IP:127.0.0.1\n")
    _openssl(d, "ca", "-batch", "-config", "ca.cnf", "-in", "expired.csr", "-out",
             "expired.crt", "-startdate", "20200101000000Z", "-enddate", "20200102000000Z")
    (d / "junk.pem").write_text("this is not a certificate\n")
    return d


def _tls_broker(workdir: Path, pki: Path, cert: str = "server") -> Mosquitto:
    b = Mosquitto(workdir, listener_conf=(
        "allow_anonymous true", f"cafile {pki / 'ca.crt'}", f"certfile {pki / f'{cert}.crt'}",
        f"keyfile {pki / f'{cert}.key'}"))
    b.start()
    return b


@pytest.fixture
def tls_broker(tmp_path, pki):
    b = _tls_broker(tmp_path / "tls", pki)
    yield b
    b.stop(kill=True)


def _source(host: str, port: int, receiver: str, **mqtt):
    # A short cap: several attempts fail within a test, so rate limiting shows.
    settings = MqttSettings(host=host, port=port, reconnect_min_s=0.1, reconnect_max_s=0.5,
                            **mqtt)
    return make_mqtt_source(MqttSourceSettings(mqtt=settings, receiver=receiver))


def _first_error(source, timeout_s: float = 10.0) -> str:
    """The source's last_error once its first attempt has failed; it never subscribes."""
    # wait_connected() is the path the daemon waits on, and what moves the receiver
    # process's status along (its last_error property only reports)
    error = wait_until(lambda: not source.wait_connected(0.05) and source.last_error,
                       timeout_s, "a connection error")
    assert not source.wait_connected(0.5)
    assert source.stats()["connect_failures"] >= 1
    assert source.last_error  # stats() are numbers; the cause is last_error
    return error


# --- the cause of a failed connection, by kind ------------------------------------------
@pytest.mark.parametrize("receiver", RECEIVERS)
def test_wrong_ca_names_unknown_ca(tls_broker, pki, receiver):
    with _source(tls_broker.host, tls_broker.port, receiver,
                 tls_ca_file=str(pki / "other-ca.crt")) as source:
        error = _first_error(source)
    assert "certificate verify failed" in error and "unknown CA" in error, error
    assert str(pki / "other-ca.crt") in error and str(tls_broker.port) in error


@pytest.mark.parametrize("receiver", RECEIVERS)
def test_hostname_mismatch_is_named(tls_broker, pki, receiver):
    # The certificate names IP 127.0.0.1; "localhost" reaches the same broker.
    with _source("localhost", tls_broker.port, receiver,
                 tls_ca_file=str(pki / "ca.crt")) as source:
        error = _first_error(source)
    assert "hostname mismatch" in error and "'localhost'" in error, error


def test_expired_certificate_is_named(tmp_path, pki):
    b = _tls_broker(tmp_path / "expired", pki, cert="expired")
    try:
        with _source(b.host, b.port, "thread", tls_ca_file=str(pki / "ca.crt")) as source:
            error = _first_error(source)
    finally:
        b.stop(kill=True)
    assert "expired" in error and "certificate verify failed" in error, error


@pytest.mark.parametrize("receiver", RECEIVERS)
def test_tls_against_a_plain_port_names_the_handshake(broker, pki, receiver):
    with _source(broker.host, broker.port, receiver,
                 tls_ca_file=str(pki / "ca.crt")) as source:
        error = _first_error(source)
    assert "TLS handshake failed" in error and "plain MQTT port" in error, error


@pytest.mark.parametrize("receiver", RECEIVERS)
def test_plain_against_a_tls_port_says_set_tls(tls_broker, receiver):
    with _source(tls_broker.host, tls_broker.port, receiver) as source:
        error = _first_error(source)
    assert "closed the connection before answering CONNECT" in error, error
    assert "TLS listener, set tls_ca_file" in error


@pytest.mark.parametrize("client", [None, "other-ca"])
def test_broker_refusing_our_client_certificate_is_named(tmp_path, pki, client):
    """TLS 1.3 sends that verdict after the handshake: paho only logs it."""
    b = Mosquitto(tmp_path / "mtls", listener_conf=(
        "allow_anonymous true", f"cafile {pki / 'ca.crt'}", f"certfile {pki / 'server.crt'}",
        f"keyfile {pki / 'server.key'}", "require_certificate true"))
    b.start()
    mqtt = {"tls_ca_file": str(pki / "ca.crt")}
    if client is not None:  # a certificate the broker's CA did not sign
        mqtt.update(tls_cert_file=str(pki / f"{client}.crt"),
                    tls_key_file=str(pki / f"{client}.key"))
    try:
        with _source(b.host, b.port, "thread", **mqtt) as source:
            error = _first_error(source)
    finally:
        b.stop(kill=True)
    assert "refused our client certificate" in error and "tls_cert_file" in error, error


@pytest.mark.parametrize("receiver", RECEIVERS)
def test_refused_port_says_connection_refused(receiver):
    port = free_port()  # nothing listens there
    with _source("127.0.0.1", port, receiver) as source:
        error = _first_error(source)
    assert f"connection refused by 127.0.0.1:{port}" in error, error


def test_unresolvable_host_says_dns():
    with _source("no-such-broker.invalid", 1883, "thread") as source:
        error = _first_error(source, timeout_s=20)
    assert "DNS failure" in error and "'no-such-broker.invalid'" in error, error


@pytest.mark.parametrize("receiver", RECEIVERS)
def test_bad_credentials_name_the_connack_refusal(tmp_path, receiver):
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "edge", "pa55word"],
                   check=True, capture_output=True)
    (tmp_path / "wrong").write_text("nope\n")
    (tmp_path / "wrong").chmod(0o600)
    b = Mosquitto(tmp_path / "auth", listener_conf=("allow_anonymous false",
                                                    f"password_file {pwfile}"))
    b.start()
    try:
        with _source(b.host, b.port, receiver, username="edge",
                     password_secret=str(tmp_path / "wrong")) as source:
            error = _first_error(source)
    finally:
        b.stop(kill=True)
    assert "refused user 'edge'" in error and "CONNACK" in error, error
    assert "password_secret" in error


def test_first_failure_is_warned_at_once_then_rate_limited(caplog):
    """Several attempts fail with one cause: one WARNING (the first), not one per attempt."""
    port = free_port()
    with caplog.at_level(logging.WARNING, logger="edgefuse.sensors.live.mqtt_client"):
        with _source("127.0.0.1", port, "thread") as source:
            wait_until(lambda: source.stats()["connect_failures"] >= 4, 10, "4 failed attempts")
    lines = [r.getMessage() for r in caplog.records
             if r.name == "edgefuse.sensors.live.mqtt_client"]
    assert len(lines) == 1, lines
    assert "connection refused" in lines[0] and "retrying" in lines[0]


def test_last_error_clears_once_connected(broker):
    broker.stop()
    with _source(broker.host, broker.port, "process") as source:
        assert "connection refused" in _first_error(source)
        broker.start()
        assert source.wait_connected(10), source.stats()
        assert source.last_error is None


# --- files that are not what their key says: one line, before any thread ----------------
@pytest.mark.parametrize("receiver", RECEIVERS)
def test_ca_file_that_is_not_a_certificate_is_a_one_line_config_error(pki, receiver):
    threads = threading.active_count()
    source = _source("127.0.0.1", free_port(), receiver, tls_ca_file=str(pki / "junk.pem"))
    with pytest.raises(ConfigError) as info:
        source.open()
    message = str(info.value)
    assert message.startswith(f"[mqtt] tls_ca_file {pki / 'junk.pem'} is not a PEM certificate")
    assert "\n" not in message
    assert threading.active_count() == threads  # no paho thread, no receiver process
    assert getattr(source, "_proc", None) is None
    with pytest.raises(ConfigError, match="tls_ca_file .*ca.key is not a PEM certificate"):
        _source("127.0.0.1", 1, receiver, tls_ca_file=str(pki / "ca.key")).open()


@pytest.mark.parametrize("cert, key, expected", [
    ("junk.pem", "client.key", r"tls_cert_file .*junk.pem is not a PEM certificate"),
    ("client.crt", "junk.pem", r"tls_key_file .*junk.pem is not a PEM private key"),
    ("client.crt", "server.key", r"tls_key_file .*server.key is not the private key of "
                                 r"tls_cert_file .*client.crt"),
])
def test_client_certificate_files_are_checked_one_line(pki, cert, key, expected):
    source = _source("127.0.0.1", 1, "thread", tls_ca_file=str(pki / "ca.crt"),
                     tls_cert_file=str(pki / cert), tls_key_file=str(pki / key))
    with pytest.raises(ConfigError, match=expected) as info:
        source.open()
    assert "\n" not in str(info.value)


def test_encrypted_key_is_refused_instead_of_prompting(pki, tmp_path):
    encrypted = tmp_path / "enc.key"
    _openssl(tmp_path, "pkey", "-in", str(pki / "client.key"), "-aes256", "-passout", "pass:x",
             "-out", str(encrypted))
    source = _source("127.0.0.1", 1, "thread", tls_ca_file=str(pki / "ca.crt"),
                     tls_cert_file=str(pki / "client.crt"), tls_key_file=str(encrypted))
    with pytest.raises(ConfigError, match="is encrypted; a service cannot type a passphrase"):
        source.open()


# --- client ids, reconnect cap ---------------------------------------------------------
def test_client_id_rule():
    unset = MqttSettings()
    assert unset.resolved_client_id("source").startswith("edgefuse-source-")
    assert unset.resolved_client_id("decisions").endswith(f"-{os.getpid()}")
    named = MqttSettings(client_id="edgefuse-gw1")
    assert named.resolved_client_id("source") == "edgefuse-gw1"
    assert named.resolved_client_id("decisions") == "edgefuse-gw1-decisions"
    with pytest.raises(ConfigError, match="client_id"):
        MqttSettings(client_id="bad\nid")
    assert MqttSettings().reconnect_max_s == 5.0 and MqttSettings().reconnect_min_s == 0.5


def test_source_and_decision_publisher_with_one_client_id_do_not_take_each_other_over(
        broker, tmp_path):
    from edgefuse.runtime.service.sinks import MqttDecisionSink
    settings = MqttSettings(host=broker.host, port=broker.port, client_id="edgefuse-gw1",
                            reconnect_min_s=0.1, reconnect_max_s=0.5)
    source = make_mqtt_source(MqttSourceSettings(mqtt=settings, receiver="thread"))
    with source:
        assert source.wait_connected(5)
        sink = MqttDecisionSink(tmp_path / "outbox.db", settings)
        try:
            sink.open()  # sinks connect in open(), as sources do
            wait_until(lambda: sink.connected, 5, "the decision publisher to connect")
            time.sleep(2.0)  # a takeover loop would have cycled many times by now
            assert sink.connected and sink.stats()["disconnects"] == 0
            stats = source.stats()
        finally:
            sink.close()
    assert stats["disconnects"] == 0 and stats["connects"] == 1, stats


# --- the subscription excludes our own decisions ---------------------------------------
@pytest.mark.parametrize("receiver", RECEIVERS)
def test_own_decisions_are_never_received(broker, receiver):
    """As the daemon opens it: the model's modalities name the subscriptions."""
    settings = MqttSettings(host=broker.host, port=broker.port)
    source = make_mqtt_source(MqttSourceSettings(mqtt=settings, receiver=receiver),
                              modalities=("acoustic", "seismic"))
    assert source.filters == ["edgefuse/+/acoustic", "edgefuse/+/seismic"]
    with source:
        assert source.wait_connected(5)
        want = make_chunk(seq=3)
        publish(broker, [(topic("n1", "decisions"), b'{"node":"n1","seq":1}'),
                         (topic("n1", "acoustic"), wire.encode_json(want))])
        assert [c.seq for c in read_n(source, 1)] == [3]
        # The process receiver's counts come with its status lines (every 0.1 s).
        wait_until(lambda: source.stats()["received"] >= 1, 5, "the received count")
        time.sleep(0.3)
        stats = source.stats()
    assert stats["received"] == 1 and stats["ignored"] == 0, stats


def test_custom_topic_pattern_subscribes_per_modality(broker):
    settings = MqttSettings(host=broker.host, port=broker.port)
    source = make_mqtt_source(MqttSourceSettings(
        mqtt=settings, receiver="thread", topic_pattern="site/+/{modality}/dev/{node}",
        allowed_modalities=("imu",)))
    assert source.filters == ["site/+/imu/dev/+"]
    with source:
        assert source.wait_connected(5)
        publish(broker, [("site/a/decisions/dev/w1", b"{}"),
                         ("site/a/imu/dev/w1", wire.encode_json(make_chunk("w1", "imu", seq=4)))])
        got = read_n(source, 1)
        time.sleep(0.3)
        stats = source.stats()
    assert (got[0].node, got[0].modality, got[0].seq) == ("w1", "imu", 4)
    assert stats["received"] == 1


# --- persistent session: the broker holds QoS 1 chunks while we are away -------------------
def test_persistent_session_settings_are_checked():
    with pytest.raises(ConfigError, match="needs a fixed \\[mqtt\\] client_id"):
        MqttSourceSettings(persistent_session=True, qos=1)
    with pytest.raises(ConfigError, match="needs qos = 1"):
        MqttSourceSettings(persistent_session=True, mqtt=MqttSettings(client_id="gw1"))
    with pytest.raises(ConfigError, match="session_expiry_s"):
        MqttSourceSettings(session_expiry_s=0)
    ok = MqttSourceSettings(persistent_session=True, qos=1, mqtt=MqttSettings(client_id="gw1"))
    assert ok.session_expiry == 300 and MqttSourceSettings().session_expiry == 0


def _session_source(broker: Mosquitto, receiver: str, persistent: bool, client_id: str,
                    protocol: str = "5"):
    settings = MqttSettings(host=broker.host, port=broker.port, client_id=client_id,
                            protocol=protocol, reconnect_min_s=0.1, reconnect_max_s=0.5)
    return make_mqtt_source(MqttSourceSettings(
        mqtt=settings, receiver=receiver, qos=1, persistent_session=persistent),
        modalities=("acoustic",))


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
@pytest.mark.parametrize("receiver", RECEIVERS)
def test_persistent_session_delivers_what_was_sent_while_closed(broker, receiver, protocol):
    sent = [make_chunk(seq=i, integers=True) for i in range(5)]
    items = [(topic("n1", "acoustic"), wire.encode_binary(c, "<i2")) for c in sent]
    for persistent in (False, True):  # a clean session is the control: it loses them
        cid = f"gw-{receiver}-{protocol}-{persistent}"
        with _session_source(broker, receiver, persistent, cid, protocol) as first:
            assert first.wait_connected(5)
        publish(broker, items, qos=1)  # nobody is connected now
        with _session_source(broker, receiver, persistent, cid, protocol) as second:
            assert second.wait_connected(5)
            if persistent:
                assert [c.seq for c in read_n(second, 5)] == [0, 1, 2, 3, 4]
            else:
                time.sleep(0.5)
                assert second.read(0.2) == []


def test_persistent_session_keeps_chunks_across_a_killed_receiver(broker):
    """The receiver process dies: the broker holds the chunks until its successor is back."""
    with _session_source(broker, "process", True, "gw-kill") as source:
        assert source.wait_connected(5)
        os.kill(source._proc.pid, signal.SIGKILL)
        wait_until(lambda: not source.wait_connected(0), 5,
                   "the source to notice its receiver died")
        publish(broker, [(topic("n1", "acoustic"), wire.encode_json(make_chunk(seq=i)))
                         for i in range(4)], qos=1)
        assert [c.seq for c in read_n(source, 4, timeout_s=10)] == [0, 1, 2, 3]
        assert source.stats()["receiver_starts"] == 2


# --- rejection warnings: topic named, rate-limited per (topic, reason) --------------------
def test_rejection_warnings_name_the_topic_and_are_rate_limited(caplog):
    now = [0.0]
    counters = Counters(("oversized",))
    counters.rejections = RejectionLog(period_s=60.0, burst=3, clock=lambda: now[0])

    def reject(t, reason="bad_fields"):
        node, modality = t.split("/")[1:]
        count_rejection(counters, RejectedMessage(reason, "field 'values' missing"),
                        topic=t, node=node, modality=modality)

    with caplog.at_level(logging.WARNING, logger="edgefuse.sensors.live.accounting"):
        for _ in range(5):
            reject("edgefuse/n1/acoustic")
        reject("edgefuse/n2/acoustic")            # another topic: its own first line
        reject("edgefuse/n1/acoustic", "bad_json")  # another reason: its own first line
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 3, lines
        assert lines[0].startswith("skipped a message from topic 'edgefuse/n1/acoustic', "
                                   "node 'n1', modality 'acoustic': bad_fields:")
        now[0] = 61.0
        reject("edgefuse/n1/acoustic")  # a minute later: one line with the count since
        assert "(4 more like this in the last 60 s)" in caplog.records[-1].getMessage()
        caplog.clear()
        for i in range(50):  # a flood of names: at most burst lines, then a summary
            reject(f"edgefuse/fake{i}/acoustic")
        lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines  # burst of 3 per reason and minute: 1 used above, 2 + summary
    assert lines[-1].startswith("more than 3 sources sent bad_fields messages")
    assert counters.stats()["malformed"] == {"bad_fields": 57, "bad_json": 1}


def test_rejection_warning_of_a_live_source_names_topic(broker, caplog):
    settings = MqttSettings(host=broker.host, port=broker.port)
    with caplog.at_level(logging.WARNING, logger="edgefuse.sensors.live.accounting"):
        with make_mqtt_source(MqttSourceSettings(mqtt=settings, receiver="process"),
                              modalities=("seismic",)) as source:
            assert source.wait_connected(5)
            publish(broker, [(topic("evil5", "seismic"), b'{"t0_ns": 1, "seq": 1}')] * 3)
            wait_until(lambda: source.stats()["malformed_total"] == 3, 5, "3 rejections")
    lines = [r.getMessage() for r in caplog.records if "skipped a message" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "topic 'edgefuse/evil5/seismic', node 'evil5', modality 'seismic': bad_fields" \
        in lines[0]
