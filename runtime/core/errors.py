"""One exception root for the whole package.

Messages say what was expected, what was found and what to do next; the
structured fields let callers (the CLI, metrics) act without parsing text.
"""
from __future__ import annotations


class EdgefuseError(Exception):
    """Root of every error edgefuse raises on purpose."""


class InputError(EdgefuseError):
    """An input (file, log, message) is missing, unreadable or malformed."""

    def __init__(self, message: str, *, path: str | None = None):
        super().__init__(message)
        self.path = path


class CorruptLogError(InputError):
    """A recorded log cannot be parsed (truncated, wrong magic, bad record)."""


class UnknownRateError(InputError):
    """A stream's sample rate is neither given nor estimable."""


class ModelContractError(EdgefuseError):
    """A model file lacks the edgefuse metadata or contradicts itself."""


class ModalityMismatchError(EdgefuseError):
    """The modalities of the input do not match those the model expects."""


class ProviderError(EdgefuseError):
    """A required ONNX Runtime execution provider is not available."""


class ConfigError(EdgefuseError):
    """A configuration value is unknown or out of its allowed range."""


class WireFormatError(EdgefuseError, ValueError):
    """A chunk on the wire (JSON or binary) is malformed.

    reason: a counter name for the sources when the decoder knows better than
    the payload's shape (e.g. "bad_rate", "bad_time"); None otherwise.
    """

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


class TransportError(EdgefuseError, OSError):
    """A transport (MQTT broker, serial port) failed."""
