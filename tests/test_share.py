"""Why partitioned daemons do not use MQTT shared subscriptions, on a real Mosquitto.

``$share/<group>/<filter>`` gives each message to one member of the group, in
turn, message by message: the streams of one node (and even consecutive
chunks of one stream) land on different daemons, and no daemon can align a
node it sees only a third of. Topic partitions (sensors.live.topics: node X
publishes to ``edgefuse/p<k>/X/<modality>``, k = CRC-32 of X mod N) keep every
stream of a node on one subscriber, on the same broker.
"""
from __future__ import annotations

import pytest

from edgefuse.sensors.live.topics import PARTITIONED_PATTERN, Partition, TopicPattern
from tests.conftest import Collector, publish, wait_until

pytestmark = pytest.mark.timeout(60)

NODES = [f"n{i}" for i in range(6)]
MODALITIES = ("acoustic", "seismic")
CHUNKS = 10   # per stream


def _messages(topic_of) -> list[tuple[str, bytes]]:
    """Every node's streams, interleaved in time as live nodes send them."""
    return [(topic_of(node, modality), f"{node}/{modality}/{seq}".encode())
            for seq in range(CHUNKS) for node in NODES for modality in MODALITIES]


def _subscribers_per_node(collectors: list[Collector], total: int) -> dict[str, set[int]]:
    wait_until(lambda: sum(len(c.payloads()) for c in collectors) >= total, 20,
               f"{total} messages at the subscribers")
    seen: dict[str, set[int]] = {}
    for k, collector in enumerate(collectors):
        for payload in collector.payloads():
            seen.setdefault(payload.decode().split("/")[0], set()).add(k)
    return seen


def test_shared_subscription_splits_a_nodes_streams_among_daemons(broker):
    collectors = [Collector(broker, "$share/edgefuse/edgefuse/+/+") for _ in range(3)]
    try:
        items = _messages(lambda node, modality: f"edgefuse/{node}/{modality}")
        publish(broker, items)
        seen = _subscribers_per_node(collectors, len(items))
        payloads = [p for c in collectors for p in c.payloads()]
    finally:
        for c in collectors:
            c.close()
    assert sorted(payloads) == sorted(p for _, p in items)  # each message once, in the group
    split = {node: sorted(ks) for node, ks in seen.items() if len(ks) > 1}
    assert split.keys() == set(NODES), f"nodes kept whole by $share: {set(NODES) - split.keys()}"


def test_topic_partitions_keep_every_stream_of_a_node_on_one_subscriber(broker):
    partitions = 3
    collectors = [Collector(broker, TopicPattern(PARTITIONED_PATTERN,
                                                 Partition(k, partitions)).filter)
                  for k in range(partitions)]
    sender = TopicPattern(PARTITIONED_PATTERN)
    try:
        items = _messages(lambda node, modality: sender.topic(node, modality, partitions))
        publish(broker, items)
        seen = _subscribers_per_node(collectors, len(items))
        payloads = [p for c in collectors for p in c.payloads()]
    finally:
        for c in collectors:
            c.close()
    assert sorted(payloads) == sorted(p for _, p in items)
    assert seen == {node: {_owner(node, partitions)} for node in NODES}
    assert len({k for ks in seen.values() for k in ks}) > 1  # the nodes are spread


def _owner(node: str, partitions: int) -> int:
    return next(k for k in range(partitions) if Partition(k, partitions).owns(node))
