"""Wire formats of a chunk: compact binary and JSON.

Used by MCAP logs (binary), MQTT payloads and serial frames (either). The
node and modality travel beside the payload (MQTT topic, MCAP channel
topic, serial JSON object), never inside the binary header.

Binary layout, little-endian, 40-byte header then samples:

    offset size  field
    0      4     magic  b"EFCK"
    4      1     version (1)
    5      1     dtype  1=int16, 2=float32, 3=int32
    6      2     channels (uint16, >= 1)
    8      8     rate_hz (float64; 0 = unknown, the aligner estimates it)
    16     8     t0_ns (int64, device time of the first sample, ns since the epoch)
    24     8     seq (int64)
    32     4     full_scale (float32; 0 = unknown)
    36     4     reserved (0)
    40     ...   samples [n][channels] of dtype, row-major

JSON: {"t0_ns": int, "rate_hz": float|0|null, "seq": int,
       "values": [[...], ...] or [...] for one channel,
       "full_scale": float (optional)}

rate_hz 0 means "unknown" in both formats (the aligner estimates the rate from
t0), like null in JSON: a sender that cannot tell its rate writes 0 in either.
Encoders write 0 (binary) and null (JSON) for an unknown rate.

Both decoders refuse (WireFormatError) a rate outside [1e-3, 1e7) Hz and a
t0_ns outside [0, 2**62): the bounds of ``edgefuse.runtime.core.chunk``. The
aligner narrows the rate further to a range around each modality's rate.
"""
from __future__ import annotations

import json
import math
import struct

import numpy as np

from edgefuse.runtime.core.chunk import RATE_MAX_HZ, RATE_MIN_HZ, T0_MIN_NS, Chunk, rate_ok, t0_ok
from edgefuse.runtime.core.errors import InputError, WireFormatError

MAGIC = b"EFCK"
VERSION = 1
HEADER = struct.Struct("<4sBBHdqqfI")
HEADER_SIZE = HEADER.size  # 40
DTYPES = {1: np.dtype("<i2"), 2: np.dtype("<f4"), 3: np.dtype("<i4")}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
DEFAULT_MAX_PAYLOAD = 1 << 20  # 1 MiB: > 25 s of 9.9 kHz int16 audio
MAX_CHANNELS = 64


def _check_size(payload: bytes, max_payload: int) -> None:
    if len(payload) > max_payload:
        raise WireFormatError(
            f"payload of {len(payload)} bytes exceeds the limit of {max_payload} bytes; "
            "send smaller chunks or raise max_payload_bytes"
        )


def encode_binary(chunk: Chunk, dtype: str | np.dtype = "<f4") -> bytes:
    """Encode a chunk; dtype int16 keeps PCM data at half the size of float32."""
    dt = np.dtype(dtype).newbyteorder("<")
    if dt not in DTYPE_CODES:
        raise WireFormatError(f"dtype must be one of int16, float32, int32; found {dt}")
    if not 1 <= chunk.channels <= MAX_CHANNELS:
        raise WireFormatError(f"channels must be 1..{MAX_CHANNELS}, found {chunk.channels}")
    values = chunk.samples
    if dt.kind == "i":
        info = np.iinfo(dt)
        if values.size and (not np.all(np.isfinite(values))
                            or values.min() < info.min or values.max() > info.max
                            or not np.array_equal(values, np.round(values))):
            raise WireFormatError(
                f"samples of {chunk.node}/{chunk.modality} are not integers within {dt}; "
                "encode them as float32"
            )
    header = HEADER.pack(
        MAGIC, VERSION, DTYPE_CODES[dt], chunk.channels,
        float(chunk.rate_hz or 0.0), chunk.t0_ns, chunk.seq,
        float(chunk.full_scale or 0.0), 0,
    )
    return header + np.ascontiguousarray(values, dtype=dt).tobytes()


def decode_binary(payload: bytes, node: str, modality: str,
                  max_payload: int = DEFAULT_MAX_PAYLOAD) -> Chunk:
    """Decode a binary chunk; raises WireFormatError saying what is wrong."""
    _check_size(payload, max_payload)
    if len(payload) < HEADER_SIZE:
        raise WireFormatError(
            f"binary chunk of {len(payload)} bytes is shorter than its {HEADER_SIZE}-byte header "
            "(truncated frame?)"
        )
    magic, version, code, channels, rate, t0_ns, seq, full_scale, _ = HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise WireFormatError(f"binary chunk magic must be {MAGIC!r}, found {magic!r}")
    if version != VERSION:
        raise WireFormatError(f"binary chunk version must be {VERSION}, found {version}; "
                              "upgrade edgefuse or the sender")
    if code not in DTYPES:
        raise WireFormatError(f"dtype code must be one of {sorted(DTYPES)}, found {code}")
    if not 1 <= channels <= MAX_CHANNELS:
        raise WireFormatError(f"channels must be 1..{MAX_CHANNELS}, found {channels}")
    dt = DTYPES[code]
    body = len(payload) - HEADER_SIZE
    frame = channels * dt.itemsize
    if body % frame:
        raise WireFormatError(
            f"binary chunk body of {body} bytes is not a whole number of {channels}-channel "
            f"{dt} frames ({frame} bytes each): truncated?"
        )
    values = np.frombuffer(payload, dtype=dt, offset=HEADER_SIZE).reshape(-1, channels)
    if rate != 0.0 and not rate_ok(rate):
        raise WireFormatError(f"{node}/{modality} seq {seq}: rate_hz must be 0 (unknown) or in "
                              f"[{RATE_MIN_HZ:g}, {RATE_MAX_HZ:g}) Hz, found {rate!r}",
                              reason="bad_rate")
    _check_t0(t0_ns, node, modality, seq)
    try:
        return Chunk(node, modality, t0_ns, rate or None, values.astype(np.float32), seq,
                     full_scale=float(full_scale) or None)
    except InputError as exc:
        raise WireFormatError(str(exc)) from exc


def encode_json(chunk: Chunk) -> bytes:
    obj = {"t0_ns": chunk.t0_ns, "rate_hz": chunk.rate_hz, "seq": chunk.seq,
           "values": chunk.samples.tolist()}
    if chunk.full_scale:
        obj["full_scale"] = chunk.full_scale
    return json.dumps(obj, separators=(",", ":")).encode()


def _require_int(obj: dict, key: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireFormatError(f"JSON chunk field {key!r} must be an integer, found {value!r}")
    if not -(1 << 63) <= value < (1 << 63):
        raise WireFormatError(f"JSON chunk field {key!r} is outside int64: {value!r}")
    return value


# 2000-01-01 and 2100-01-01 in ns since the epoch: where a real device clock's t0 lies
T0_PLAUSIBLE_MIN_NS = 946_684_800_000_000_000
T0_PLAUSIBLE_MAX_NS = 4_102_444_800_000_000_000
_UNIT_HINTS = ((1_000_000_000, "seconds"), (1_000_000, "milliseconds"), (1_000, "microseconds"))


def t0_unit_hint(t0_ns: int) -> str | None:
    """The unit a sender likely used by mistake for ``t0_ns`` ("seconds",
    "milliseconds", "microseconds"): the one that, scaled to ns, puts t0 in
    2000..2100; None when t0 is plausible ns, or no unit explains it.

    t0_unit_hint(1_700_000_000) == "seconds"   # t0_ns = 1.7e9 looks like seconds
    """
    if T0_PLAUSIBLE_MIN_NS <= t0_ns < T0_PLAUSIBLE_MAX_NS:
        return None
    for factor, name in _UNIT_HINTS:
        if T0_PLAUSIBLE_MIN_NS <= t0_ns * factor < T0_PLAUSIBLE_MAX_NS:
            return name
    return None


def _check_t0(t0_ns: int, node: str, modality: str, seq: int) -> None:
    if not t0_ok(t0_ns):
        raise WireFormatError(
            f"{node}/{modality} seq {seq}: t0_ns must be in [{T0_MIN_NS}, 2**62) ns since "
            f"the UNIX epoch, found {t0_ns}; check the sender's clock",
            reason="bad_time")


def _finite_number(value: object, low: float, high: float) -> bool:
    """A real number (not bool) with low < value < high; huge JSON ints are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        v = float(value)
    except OverflowError:
        return False
    return math.isfinite(v) and low < v < high


def _is_zero(value: object) -> bool:
    """0 or 0.0 (not False): the wire's "rate unknown"."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def chunk_from_json_obj(obj: object, node: str, modality: str) -> Chunk:
    """Build a chunk from an already-parsed JSON object (serial JSON lines use this)."""
    if not isinstance(obj, dict):
        raise WireFormatError(f"JSON chunk must be an object, found {type(obj).__name__}")
    t0_ns = _require_int(obj, "t0_ns")
    seq = _require_int(obj, "seq")
    rate = obj.get("rate_hz")
    if _is_zero(rate):
        rate = None  # 0 = unknown, as in the binary header
    if rate is not None and not rate_ok(rate):
        raise WireFormatError(f"{node}/{modality} seq {seq}: rate_hz must be a number in "
                              f"[{RATE_MIN_HZ:g}, {RATE_MAX_HZ:g}) Hz, or 0 or null (unknown), "
                              f"found {rate!r}", reason="bad_rate")
    _check_t0(t0_ns, node, modality, seq)
    raw = obj.get("values")
    if not isinstance(raw, list) or not raw:
        raise WireFormatError("JSON chunk field 'values' must be a non-empty list "
                              "([n][channels], or [n] for one channel)")
    try:
        values = np.asarray(raw, dtype=np.float32)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireFormatError(f"'values' must hold numbers in a rectangular [n][channels] "
                              f"list: {exc}") from exc
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or not 1 <= values.shape[1] <= MAX_CHANNELS:
        raise WireFormatError(f"'values' must be [n] or [n][channels<= {MAX_CHANNELS}], "
                              f"found shape {values.shape}")
    full_scale = obj.get("full_scale")
    if full_scale is not None and not _finite_number(full_scale, 0.0, 3.4e38):
        raise WireFormatError(f"full_scale must be a positive number, found {full_scale!r}")
    try:
        return Chunk(node, modality, t0_ns, None if rate is None else float(rate), values, seq,
                     full_scale=None if full_scale is None else float(full_scale))
    except InputError as exc:
        raise WireFormatError(str(exc)) from exc


def decode_json(payload: bytes, node: str, modality: str,
                max_payload: int = DEFAULT_MAX_PAYLOAD) -> Chunk:
    _check_size(payload, max_payload)
    try:
        # parse_constant keeps NaN/Infinity literals as floats; the aligner flags them.
        obj = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        # from None: a RecursionError (deep nesting) drags a thousand-frame traceback
        # along, which later fails to format wherever it is logged; the text suffices.
        raise WireFormatError(f"JSON chunk does not parse: {exc}") from None
    return chunk_from_json_obj(obj, node, modality)


def decode_payload(payload: bytes, node: str, modality: str,
                   max_payload: int = DEFAULT_MAX_PAYLOAD) -> Chunk:
    """Binary when the payload starts with the magic, JSON otherwise."""
    if payload[:4] == MAGIC:
        return decode_binary(payload, node, modality, max_payload)
    return decode_json(payload, node, modality, max_payload)
