"""One owner per check on the input path.

- payload size: the transport (MQTT: the subscriber, before any parsing; serial: the
  line/frame parser). Decoding adds no second, different bound.
- channel count: the aligner, the same live and in replay. Sources pass such chunks on;
  the aligner refuses them, counts ``wrong_channel_chunks`` and warns (rate-limited,
  node and modality named); replay no longer refuses the input up front: it ends with
  its summary, and exits 3 saying why when nothing could be decided.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

from edgefuse.runtime.cli import main
from edgefuse.runtime.core import wire
from edgefuse.runtime.core.aligner import Aligner
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.sensors.live.accounting import OVERSIZED, RejectedMessage
from edgefuse.sensors.live.base import decode_payload
from edgefuse.sensors.live.factory import make_sources
from edgefuse.sensors.live.serial_framing import BinaryFrameParser, encode_chunk_frame
from edgefuse.sensors.live.serial_source import SerialSettings

from tests.aligner_helpers import contract
from tests.conftest import wait_until
from tests.daemon_helpers import MODEL, synthetic_chunks, write_log
from tests.test_sources_contract import SourcesSettings

T0 = 1_700_000_000_000_000_000


def _chunk(seq: int, channels: int, node: str = "s9") -> Chunk:
    return Chunk(node, "imu", T0 + seq * 10**9, 100.0, np.zeros((100, channels), np.float32), seq)


# --- channel count: the aligner's ---------------------------------------------------------

def test_a_live_source_passes_a_wrong_channel_count_and_the_aligner_refuses_it(pty_pair, caplog):
    (source,) = make_sources(SourcesSettings(serial=(
        SerialSettings(device=pty_pair.path, protocol="binary"),)), modalities=("imu",))
    with source:
        assert source.wait_connected(5)
        pty_pair.write(b"".join(encode_chunk_frame(_chunk(i, 2)) for i in range(3)))
        got: list[Chunk] = []
        wait_until(lambda: got.extend(source.read(0.05)) or len(got) == 3, 5, "three chunks")
        stats = source.stats()
    assert stats["malformed"] == {} and stats["decoded"] == 3  # not the source's check
    aligner = Aligner(contract(rates=(("imu", 3, 100.0),)))
    with caplog.at_level(logging.WARNING, logger="edgefuse.runtime.core.aligner"):
        assert all(aligner.push(c) == [] for c in got)
    assert aligner.stats()["aligner"]["wrong_channel_chunks"] == 3
    assert aligner.stats()["streams"] == {}  # refused before any stream
    (line,) = [r.getMessage() for r in caplog.records  # rate-limited: one line for three
               if r.name == "edgefuse.runtime.core.aligner"]
    assert line.startswith("s9/imu seq 0 refused (wrong_channel_chunks): expected 3 "
                           "channel(s)") and "found 2" in line


def _replay(tmp_path, chunks, capsys) -> tuple[int, str, list[str]]:
    log = write_log(tmp_path / "in.mcap", chunks)
    out = tmp_path / "d.jsonl"
    rc = main(["replay", str(log), "--model", str(MODEL), "--out", str(out), "-q"])
    return rc, out.read_text(), capsys.readouterr().err.strip().splitlines()


def _widen(chunks, modality=None):
    """Every chunk (of modality) with its one channel doubled: 2 where the model wants 1."""
    return [dataclasses.replace(c, samples=np.repeat(c.samples, 2, axis=1))
            if modality in (None, c.modality) else c for c in chunks]


def test_replay_with_every_channel_count_wrong_exits_3_saying_why(tmp_path, capsys):
    chunks = _widen(synthetic_chunks("n1", 6.0))
    rc, text, err = _replay(tmp_path, chunks, capsys)
    assert rc == 3, err
    assert text == ""
    summary, error = err[-2:]
    assert f"drops: wrong channels {len(chunks)}" in summary
    assert error.startswith(f"edgefuse replay: error: read {len(chunks)} chunks of 2 streams "
                            f"but made no decision: {len(chunks)} chunks wrong channels")


def test_replay_with_one_wrong_modality_decides_from_the_other(tmp_path, capsys):
    chunks = _widen(synthetic_chunks("n1", 6.0), "seismic")
    rc, text, err = _replay(tmp_path, chunks, capsys)
    assert rc == 0, err
    assert text and all('"missing":["seismic"]' in x for x in text.splitlines())
    wrong = sum(c.modality == "seismic" for c in chunks)
    (summary,) = [x for x in err if x.startswith("edgefuse replay: ")]
    assert f"drops: wrong channels {wrong}" in summary


# --- payload size: the transport's -----------------------------------------------------------

def test_decoding_adds_no_second_size_bound():
    """max_payload_bytes may exceed wire's default bound; the transport checked it."""
    big = Chunk("n1", "imu", T0, 100.0, np.zeros((100_000, 3), np.float32), 0)
    payload = wire.encode_binary(big)
    assert len(payload) > wire.DEFAULT_MAX_PAYLOAD
    got = decode_payload(payload, "n1", "imu")
    assert got.n == 100_000 and got.channels == 3
    with pytest.raises(RejectedMessage) as info:
        decode_payload(payload[:-5], "n1", "imu")
    assert info.value.reason == "truncated"


def test_a_frame_over_its_bound_is_refused_once_at_the_header():
    parser = BinaryFrameParser(max_frame_bytes=4096, allowed={"imu"})
    frame = encode_chunk_frame(_chunk(1, 3))  # 100 x 3 float32: > 1 KiB
    small = BinaryFrameParser(max_frame_bytes=1024, allowed={"imu"})
    assert [c.seq for c in parser.feed(frame)] == [1] and parser.stats()["malformed"] == {}
    assert small.feed(frame) == []
    assert small.stats()["malformed"] == {OVERSIZED: 1}
