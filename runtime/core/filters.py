"""Design of the anti-alias low-pass, in numpy (scipy.signal costs ~1 s of
start-up on a Pi just to import; the tests check this against scipy.signal.butter).
"""
from __future__ import annotations

import numpy as np


def butter4_lowpass_sos(cutoff_hz: float, rate_hz: float) -> np.ndarray:
    """Order-4 Butterworth low-pass as two second-order sections [2, 6]
    (rows b0 b1 b2 1 a1 a2), as scipy.signal.butter(4, cutoff, fs=rate, output="sos"):
    analog prototype, pre-warped bilinear transform, conjugate poles paired, the
    pair nearest the unit circle last, the gain in the first section."""
    if not 0.0 < cutoff_hz < rate_hz / 2.0:
        raise ValueError(f"cutoff must be in (0, rate/2) = (0, {rate_hz / 2}); found {cutoff_hz}")
    order = 4
    m = np.arange(-order + 1, order, 2)
    poles = -np.exp(1j * np.pi * m / (2 * order))          # analog prototype, cutoff 1 rad/s
    fs = 2.0                                                 # scipy designs at fs = 2
    warped = 2 * fs * np.tan(np.pi * (cutoff_hz / (rate_hz / 2.0)) / fs)
    poles = poles * warped
    gain = warped ** order
    zpoles = (2 * fs + poles) / (2 * fs - poles)             # bilinear transform
    gain = gain * np.real(1.0 / np.prod(2 * fs - poles))
    upper = sorted((p for p in zpoles if p.imag > 0), key=abs)
    sos = np.zeros((2, 6))
    for row, p in enumerate(upper):
        sos[row] = [1.0, 2.0, 1.0, 1.0, -2.0 * p.real, abs(p) ** 2]  # zeros at z = -1
    sos[0, :3] *= gain
    return sos


def lowpass_delay_samples(sos: np.ndarray) -> float:
    """Group delay at 0 Hz, in input samples, of a cascade of second-order sections
    (rows b0 b1 b2 a0 a1 a2, a0 = 1): the sum over sections of the delay of the
    numerator minus that of the denominator, each sum(k c_k) / sum(c_k). For a low-pass
    it is also the centroid of the impulse response: where a spike's energy lands."""
    delay = 0.0
    for b0, b1, b2, a0, a1, a2 in np.asarray(sos, np.float64):
        delay += (b1 + 2.0 * b2) / (b0 + b1 + b2) - (a1 + 2.0 * a2) / (a0 + a1 + a2)
    return float(delay)
