"""Partitions: the node hash devices compute, the topics, the settings, and an MQTT
source of partition K on a real Mosquitto (sensors.live.topics)."""
from __future__ import annotations

import logging

import pytest

from edgefuse.runtime.cli import main
from edgefuse.runtime.core import wire
from edgefuse.runtime.core.errors import ConfigError
from edgefuse.runtime.service import config
from edgefuse.runtime.service.metrics import DaemonMetrics
from edgefuse.runtime.service.simulate import MqttPublisher
from edgefuse.sensors.live.accounting import BAD_TOPIC, RejectedMessage
from edgefuse.sensors.live.mqtt_client import MqttSettings
from edgefuse.sensors.live.topics import (DEFAULT_PATTERN, PARTITIONED_PATTERN, WRONG_PARTITION,
                                          Partition, TopicPattern, partition_of)
from tests.conftest import publish, wait_until
from tests.test_mqtt_source import make_chunk, read_n, source_for


def crc32_reference(data: bytes) -> int:
    """The README's reference, bit by bit, as a device without zlib computes it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def test_partition_is_crc32_of_the_utf8_name_mod_n():
    assert crc32_reference(b"123456789") == 0xCBF43926  # the CRC-32 check value
    names = ["123", "n1", "node-0042", "2D.16.123", "gw1 north", "Knoten-Köln", "节点7", ""]
    for name in names:
        for n in (1, 2, 3, 7, 1024):
            assert partition_of(name, n) == crc32_reference(name.encode("utf-8")) % n
    spread = {partition_of(f"node{i}", 3) for i in range(30)}
    assert spread == {0, 1, 2}


def test_partition_parse():
    assert Partition.parse(" 2/3 ") == Partition(2, 3) and str(Partition(2, 3)) == "2/3"
    for bad in ("3/3", "1", "-1/3", "a/b", "1/0", "0/1025", "1/3/5"):
        with pytest.raises(ConfigError, match="partition"):
            Partition.parse(bad)


def test_partitioned_pattern_filters_and_refuses_other_partitions():
    part = Partition(1, 3)
    mine = next(f"n{i}" for i in range(50) if part.owns(f"n{i}"))
    other = next(f"n{i}" for i in range(50) if not part.owns(f"n{i}"))
    topics = TopicPattern(PARTITIONED_PATTERN, part)
    assert topics.filters(["seismic", "acoustic", "decisions"]) == [
        "edgefuse/p1/+/acoustic", "edgefuse/p1/+/seismic"]
    assert topics.parse(f"edgefuse/p1/{mine}/acoustic") == (mine, "acoustic")
    for topic in (f"edgefuse/p1/{other}/acoustic",    # the device hashes otherwise
                  f"edgefuse/p2/{mine}/acoustic"):    # another partition's topic
        with pytest.raises(RejectedMessage) as info:
            topics.parse(topic)
        assert info.value.reason == WRONG_PARTITION
        assert info.value.node in (mine, other)
    want = f"edgefuse/p{partition_of(other, 3)}/{other}/acoustic"
    with pytest.raises(RejectedMessage, match=want):
        topics.parse(f"edgefuse/p1/{other}/acoustic")
    with pytest.raises(RejectedMessage) as info:
        topics.parse("edgefuse/px/n1/acoustic")
    assert info.value.reason == BAD_TOPIC
    # a daemon without a partition reads every partition of the pattern
    everyone = TopicPattern(PARTITIONED_PATTERN)
    assert everyone.filter == "edgefuse/+/+/+"
    assert everyone.parse(f"edgefuse/p2/{mine}/imu") == (mine, "imu")
    assert everyone.topic(mine, "imu", 3) == "edgefuse/p1/" + mine + "/imu"
    with pytest.raises(ConfigError, match="number of partitions"):
        everyone.topic(mine, "imu")
    for bad in ("a/{partition}/{partition}x/{node}/{modality}", "a/{partition}+/{node}/{modality}"):
        with pytest.raises(ConfigError):
            TopicPattern(bad)
    with pytest.raises(ConfigError, match="needs a topic pattern with a {partition} level"):
        TopicPattern(DEFAULT_PATTERN, part)


def test_partition_settings_and_client_ids():
    cfg = config.from_dict({"mqtt": {"client_id": "gw"},
                            "source": {"mqtt": {"partition": "2/3", "qos": 1,
                                                "persistent_session": True}},
                            "sink": {"mqtt": {"mqtt": {"client_id": "out"}}}})
    assert cfg.partition == Partition(2, 3)
    assert cfg.source.mqtt.resolved_pattern == PARTITIONED_PATTERN
    # N daemons of one config never share a client id, hence nor a session
    assert (cfg.mqtt.client_id, cfg.source.mqtt.mqtt.client_id,
            cfg.sink.mqtt.mqtt.client_id) == ("gw-p2", "gw-p2", "out-p2")
    plain = config.from_dict({"mqtt": {"client_id": "gw"}})
    assert plain.partition is None and plain.mqtt.client_id == "gw"
    custom = config.from_dict({"source": {"mqtt": {"partition": "0/2",
                                                   "topic_pattern": "site/{partition}/{node}/"
                                                                    "{modality}"}}})
    assert custom.source.mqtt.topic_pattern_for().filter == "site/0/+/+"
    with pytest.raises(ConfigError, match=r"\[source.mqtt\] partition 1/2 needs a topic pattern"):
        config.from_dict({"source": {"mqtt": {"partition": "1/2",
                                              "topic_pattern": "a/{node}/{modality}"}}})


def test_run_refuses_a_bad_partition_in_one_line(capsys):
    assert main(["run", "--partition", "3/3", "--no-mqtt-sink", "--out", "-"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "partition 3/3 is out of range" in err[0], err
    assert main(["run", "--partition", "0/2", "--no-mqtt-source", "--no-mqtt-sink",
                 "--out", "-"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the MQTT source" in err[0], err


def test_partition_info_metric():
    metrics = DaemonMetrics()
    assert metrics.registry.get_sample_value(
        "edgefuse_partition_info", {"partition": "0", "partitions": "1"}) == 1
    metrics.set_partition(2, 3)
    assert metrics.registry.get_sample_value(
        "edgefuse_partition_info", {"partition": "2", "partitions": "3"}) == 1
    assert metrics.registry.get_sample_value(
        "edgefuse_partition_info", {"partition": "0", "partitions": "1"}) is None


@pytest.mark.parametrize("receiver", ["process", "thread"])
def test_source_of_a_partition_takes_its_nodes_and_counts_strangers(broker, receiver, caplog):
    part = Partition(0, 2)
    mine = next(f"n{i}" for i in range(50) if part.owns(f"n{i}"))
    other = next(f"n{i}" for i in range(50) if not part.owns(f"n{i}"))
    source = source_for(broker, receiver, partition=str(part))
    sender = TopicPattern(PARTITIONED_PATTERN)
    want = [make_chunk(mine, seq=s) for s in range(3)]
    source.open()
    try:
        assert source.wait_connected(10)
        with caplog.at_level(logging.WARNING, logger="edgefuse"):
            publish(broker, [
                (f"edgefuse/p0/{other}/acoustic", wire.encode_binary(make_chunk(other))),
                (sender.topic(other, "acoustic", 2), wire.encode_binary(make_chunk(other))),
                *[(sender.topic(mine, "acoustic", 2), wire.encode_binary(c)) for c in want]])
            got = read_n(source, len(want))
            # the receiver process reports its counts on a status line, soon after
            stats = wait_until(lambda: source.stats()["malformed"] and source.stats(), 10,
                               "the refusal counted")
    finally:
        source.close()
    assert [(c.node, c.seq) for c in got] == [(mine, c.seq) for c in want]
    # the stranger on our topic is refused and counted; its own partition never reaches us
    assert stats["malformed"] == {WRONG_PARTITION: 1}, stats
    if receiver == "thread":  # the receiver process warns on its own stderr
        lines = [r.getMessage() for r in caplog.records if WRONG_PARTITION in r.getMessage()]
        assert len(lines) == 1 and f"node {other!r}" in lines[0], lines


def test_simulate_publishes_where_the_devices_would(broker):
    with pytest.raises(ConfigError, match="disagree"):
        MqttPublisher(MqttSettings(host=broker.host, port=broker.port),
                      topic_pattern="a/{node}/{modality}", partitions=3)
    with pytest.raises(ConfigError, match="disagree"):
        MqttPublisher(MqttSettings(host=broker.host, port=broker.port),
                      topic_pattern=PARTITIONED_PATTERN)
    publisher = MqttPublisher(MqttSettings(host=broker.host, port=broker.port), partitions=3)
    try:
        assert publisher.topics.topic("n1", "imu", publisher.partitions) == \
            f"edgefuse/p{partition_of('n1', 3)}/n1/imu"
    finally:
        publisher.close()
