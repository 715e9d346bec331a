"""Property tests of runtime.wire: round trips, and any bytes give a chunk or WireFormatError."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgefuse.runtime.core import wire
from edgefuse.runtime.core.chunk import RATE_MAX_HZ, RATE_MIN_HZ, T0_MAX_NS, Chunk
from edgefuse.runtime.core.errors import WireFormatError

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

shapes = st.tuples(st.integers(0, 50), st.integers(1, 8))
rates = st.one_of(st.none(), st.floats(1e-3, 9.99e6, allow_nan=False))
t0s = st.integers(0, (1 << 62) - 1)                     # what the decoders accept
any_t0s = st.integers(-(1 << 63), (1 << 63) - 1)        # what a binary header can carry
seqs = st.integers(-(1 << 63), (1 << 63) - 1)
full_scales = st.one_of(st.none(), st.sampled_from([1.0, 32767.0, 2147483647.0, 0.5]))


def _same(a: Chunk, b: Chunk, binary: bool = True) -> None:
    """a decoded from b. The binary header stores full_scale as float32 (by design:
    2**31-1 comes back as 2**31), JSON keeps it exactly."""
    assert (a.node, a.modality, a.t0_ns, a.seq) == (b.node, b.modality, b.t0_ns, b.seq)
    assert a.rate_hz == b.rate_hz
    expected_fs = b.full_scale
    if binary and expected_fs is not None:
        expected_fs = float(np.float32(expected_fs))
    assert a.full_scale == expected_fs
    assert a.samples.shape == b.samples.shape
    np.testing.assert_array_equal(a.samples, b.samples)  # NaN == NaN here


@SETTINGS
@given(shape=shapes, rate=rates, t0=t0s, seq=seqs, fs=full_scales, data=st.data())
def test_binary_round_trip_float32(shape, rate, t0, seq, fs, data):
    values = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(width=32)))
    c = Chunk("n1", "acoustic", t0, rate, values, seq, full_scale=fs)
    _same(wire.decode_binary(wire.encode_binary(c, "<f4"), "n1", "acoustic"), c)


@SETTINGS
@given(shape=shapes, rate=rates, t0=t0s, seq=seqs, data=st.data())
def test_binary_round_trip_int16(shape, rate, t0, seq, data):
    values = data.draw(hnp.arrays(np.int16, shape)).astype(np.float32)
    c = Chunk("7", "seismic", t0, rate, values, seq, full_scale=32767.0)
    payload = wire.encode_binary(c, "<i2")
    assert len(payload) == wire.HEADER_SIZE + 2 * values.size
    _same(wire.decode_binary(payload, "7", "seismic"), c)


@SETTINGS
@given(shape=shapes, data=st.data())
def test_binary_int32_round_trip_of_exact_integers(shape, data):
    # float32 holds integers exactly up to 2**24; beyond that the chunk itself rounds.
    values = data.draw(hnp.arrays(np.int32, shape, elements=st.integers(-(1 << 24), 1 << 24)))
    c = Chunk("a", "imu", 5, 100.0, values.astype(np.float32), 1)
    _same(wire.decode_binary(wire.encode_binary(c, "<i4"), "a", "imu"), c)


@SETTINGS
@given(shape=shapes, data=st.data())
def test_int16_encoding_refuses_values_it_cannot_hold(shape, data):
    values = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(width=32)))
    c = Chunk("a", "b", 0, None, values, 0)
    fits = bool(np.all(np.isfinite(values)) and np.all(values == np.round(values))
                and np.all(np.abs(values + 0.5) <= 32767.5))
    if fits:
        _same(wire.decode_binary(wire.encode_binary(c, "<i2"), "a", "b"), c)
    else:
        with pytest.raises(WireFormatError):
            wire.encode_binary(c, "<i2")


@SETTINGS
@given(n=st.integers(1, 40), ch=st.integers(1, 6), rate=rates, t0=t0s, seq=seqs,
       fs=full_scales, data=st.data())
def test_json_round_trip(n, ch, rate, t0, seq, fs, data):
    values = data.draw(hnp.arrays(np.float32, (n, ch),
                                  elements=st.floats(width=32, allow_nan=False,
                                                     allow_infinity=False)))
    c = Chunk("n", "m", t0, rate, values, seq, full_scale=fs)
    _same(wire.decode_json(wire.encode_json(c), "n", "m"), c, binary=False)
    _same(wire.decode_payload(wire.encode_json(c), "n", "m"), c, binary=False)


def _decodes_or_wire_error(payload: bytes) -> None:
    try:
        chunk = wire.decode_payload(payload, "n", "m")
    except WireFormatError:
        return
    assert isinstance(chunk, Chunk)
    assert chunk.samples.dtype == np.float32 and chunk.samples.ndim == 2
    assert chunk.rate_hz is None or RATE_MIN_HZ <= chunk.rate_hz < RATE_MAX_HZ
    assert 0 <= chunk.t0_ns < T0_MAX_NS


@SETTINGS
@given(st.binary(max_size=400))
def test_decode_payload_on_arbitrary_bytes(payload):
    _decodes_or_wire_error(payload)


@SETTINGS
@given(body=st.binary(max_size=200), data=st.data())
def test_decode_payload_on_arbitrary_binary_headers(body, data):
    # Start from the magic so the binary decoder (not the JSON one) sees the junk.
    header = wire.HEADER.pack(
        wire.MAGIC, data.draw(st.integers(0, 255)), data.draw(st.integers(0, 255)),
        data.draw(st.integers(0, 65535)),
        data.draw(st.floats(allow_nan=True, allow_infinity=True)),
        data.draw(any_t0s), data.draw(seqs), data.draw(st.floats(width=32)), 0)
    _decodes_or_wire_error(header + body)


@SETTINGS
@given(flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=4),
       cut=st.integers(0, 10_000))
def test_decode_payload_on_damaged_valid_payloads(flips, cut):
    c = Chunk("n", "m", 123, 1600.0, np.arange(24, dtype=np.float32).reshape(8, 3), 4)
    for payload in (wire.encode_binary(c, "<i2"), wire.encode_json(c)):
        damaged = bytearray(payload)
        for pos, xor in flips:
            damaged[pos % len(damaged)] ^= xor
        _decodes_or_wire_error(bytes(damaged[:cut % (len(damaged) + 1)]))


# Integers within +-2**70: wider than int64 (to exercise the range checks) but not
# the >1e308 integers covered by test_json_documents_with_huge_numbers below.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats()
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=5),
    max_leaves=30)
chunk_like = st.fixed_dictionaries(
    {}, optional={"t0_ns": json_values | st.integers(), "seq": json_values | st.integers(),
                  "rate_hz": json_values | st.floats(), "values": json_values,
                  "full_scale": json_values})


@SETTINGS
@given(st.one_of(json_values, chunk_like))
def test_decode_json_on_arbitrary_json_documents(obj):
    try:
        payload = json.dumps(obj).encode()
    except (ValueError, OverflowError):
        return
    _decodes_or_wire_error(payload)


HUGE = b"1" * 400  # a JSON integer beyond float range


@pytest.mark.parametrize("payload", [
    b'{"t0_ns":1,"seq":0,"values":[' + HUGE + b"]}",
    b'{"t0_ns":1,"seq":0,"values":[1],"rate_hz":' + HUGE + b"}",
    b'{"t0_ns":1,"seq":0,"values":[1],"full_scale":' + HUGE + b"}",
    b"[" * 100_000 + b"]" * 100_000,
    b'{"t0_ns":1,"seq":0,"values":[1],"full_scale":true}',
    b'{"t0_ns":1,"seq":0,"values":[1],"full_scale":NaN}',
], ids=["huge-value", "huge-rate", "huge-full-scale", "deep-nesting", "bool-full-scale",
        "nan-full-scale"])
def test_json_documents_with_huge_numbers_or_odd_fields(payload):
    with pytest.raises(WireFormatError):
        wire.decode_payload(payload, "n", "m")


def test_json_rejects_bad_rate_and_fields_with_clear_messages():
    with pytest.raises(WireFormatError, match="rate_hz"):
        wire.decode_json(b'{"t0_ns": 1, "seq": 0, "rate_hz": -5, "values": [1]}', "n", "m")
    with pytest.raises(WireFormatError, match="t0_ns"):
        wire.decode_json(b'{"t0_ns": 1.5, "seq": 0, "values": [1]}', "n", "m")
    with pytest.raises(WireFormatError, match="values"):
        wire.decode_json(b'{"t0_ns": 1, "seq": 0, "values": []}', "n", "m")


def test_binary_rejects_truncated_body_and_oversize():
    c = Chunk("n", "m", 1, 10.0, np.ones((4, 2), np.float32), 0)
    payload = wire.encode_binary(c)
    with pytest.raises(WireFormatError, match="truncated"):
        wire.decode_binary(payload[:-1], "n", "m")
    with pytest.raises(WireFormatError, match="exceeds the limit"):
        wire.decode_binary(payload, "n", "m", max_payload=len(payload) - 1)
    assert math.isclose(wire.decode_binary(payload, "n", "m").rate_hz, 10.0)


T_OK = 1_700_000_000_000_000_000


def _binary(rate: float, t0: int) -> bytes:
    header = wire.HEADER.pack(wire.MAGIC, wire.VERSION, 2, 1, rate, t0, 1, 0.0, 0)
    return header + np.array([1, 2, 3], "<f4").tobytes()


def _json(rate: str, t0: int) -> bytes:
    return b'{"t0_ns":%d,"rate_hz":%s,"seq":1,"values":[1,2,3]}' % (t0, rate.encode())


# Issue 8: one JSON message with rate 5e-324 crashed the daemon, 1e-300 hung it.
@pytest.mark.parametrize("rate", ["5e-324", "1e-300", "1e-5", "0.0009", "-1",
                                  "10000000", "1e308", "NaN", "Infinity", "-Infinity"])
def test_absurd_rates_are_refused_by_both_decoders(rate):
    with pytest.raises(WireFormatError, match=r"rate_hz .*\[0.001, 1e\+07\) Hz.*found"):
        wire.decode_payload(_json(rate, T_OK), "evil5", "seismic")
    with pytest.raises(WireFormatError, match="evil5/seismic seq 1: rate_hz"):
        wire.decode_payload(_binary(float(rate), T_OK), "evil5", "seismic")


# Issue 11: one meaning of rate 0 in every wire format: "unknown" (the aligner estimates
# it), as null in JSON. Before, binary 0 meant unknown and JSON refused 0.
@pytest.mark.parametrize("payload", [_binary(0.0, T_OK), _binary(-0.0, T_OK), _json("0", T_OK),
                                     _json("0.0", T_OK), _json("-0", T_OK),
                                     _json("null", T_OK)],
                         ids=["binary-0", "binary-minus-0", "json-0", "json-0.0", "json-minus-0",
                              "json-null"])
def test_rate_0_means_unknown_in_every_wire_format(payload):
    chunk = wire.decode_payload(payload, "n1", "seismic")
    assert chunk.rate_hz is None
    assert chunk.t0_ns == T_OK and chunk.samples[:, 0].tolist() == [1.0, 2.0, 3.0]


def test_json_rate_false_is_not_zero():
    with pytest.raises(WireFormatError, match="rate_hz"):
        wire.decode_payload(_json("false", T_OK), "n1", "seismic")


def test_an_unknown_rate_round_trips_through_both_formats():
    c = Chunk("n1", "seismic", T_OK, None, np.ones((4, 1), np.float32), 3)
    assert wire.decode_binary(wire.encode_binary(c), "n1", "seismic").rate_hz is None
    assert wire.decode_json(wire.encode_json(c), "n1", "seismic").rate_hz is None


@pytest.mark.parametrize("t0", [-1, -(1 << 63), 1 << 62, (1 << 63) - 1])
def test_times_outside_the_range_are_refused_by_both_decoders(t0):
    for payload in (_json("800.0", t0), _binary(800.0, t0)):
        with pytest.raises(WireFormatError, match=r"t0_ns must be in \[0, 2\*\*62\)"):
            wire.decode_payload(payload, "n", "seismic")
    for t0_ok in (0, (1 << 62) - 1):
        for payload in (_json("800.0", t0_ok), _binary(800.0, t0_ok)):
            assert wire.decode_payload(payload, "n", "seismic").t0_ns == t0_ok


def test_the_rate_bounds_are_inclusive_below_and_exclusive_above():
    assert wire.decode_payload(_json("0.001", T_OK), "n", "m").rate_hz == RATE_MIN_HZ
    assert wire.decode_payload(_binary(9_999_999.0, T_OK), "n", "m").rate_hz == 9_999_999.0
