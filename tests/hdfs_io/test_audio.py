"""hdfs_io.speech.audio: probing real encoded audio and spotting the broken kinds."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from hdfs_io.speech.audio import BadAudio, probe, resample


def encoded(fmt: str, rate: int = 16000, channels: int = 1, seconds: float = 1.5) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    buf = io.BytesIO()
    sf.write(buf, np.stack([tone] * channels, axis=1), rate, format=fmt, subtype=None if fmt == "OGG" else "PCM_16")
    return buf.getvalue()


@pytest.mark.parametrize("fmt, rate, channels", [("FLAC", 16000, 1), ("WAV", 44100, 2), ("OGG", 22050, 1)])
def test_probe_reports_true_rate_channels_and_length(fmt, rate, channels):
    info = probe(encoded(fmt, rate, channels))

    assert (info.codec, info.sample_rate, info.channels) == (fmt, rate, channels)
    assert info.duration_s == pytest.approx(1.5, abs=0.01)


def damaged_inside(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(2000) + data[middle + 2000:]


@pytest.mark.parametrize("data, reason", [
    (b"", "zero-byte audio"),
    (b"just some text\n" * 40, "not audio"),
    (encoded("FLAC")[:3000], "truncated audio"),
    (encoded("WAV")[:20000], "truncated audio"),
    (damaged_inside(encoded("FLAC")), "corrupt audio"),  # the tail decodes; a frame in the middle does not
])
def test_probe_rejects_broken_audio_with_a_reason(data, reason):
    with pytest.raises(BadAudio, match=reason):
        probe(data)


def test_resample_keeps_a_tone_at_its_frequency():
    rate, target = 44100, 16000
    t = np.arange(rate) / rate
    out = resample(np.sin(2 * np.pi * 1000 * t).astype(np.float32), rate, target)

    peak_hz = np.argmax(np.abs(np.fft.rfft(out))) * target / len(out)
    assert len(out) == target and abs(peak_hz - 1000) < 2


def tone(hz: float, rate: int, seconds: float = 1.3) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t + 0.3)).astype(np.float32)


def rms(signal: np.ndarray) -> float:
    middle = signal[len(signal) // 10: -len(signal) // 10]  # away from the ends, where any filter rings
    return float(np.sqrt(np.mean(middle.astype(np.float64) ** 2)))


@pytest.mark.parametrize("rate", [44100, 48000, 22050])
def test_resampling_keeps_a_tone_below_the_new_nyquist_at_its_amplitude(rate):
    out = resample(tone(7000, rate), rate, 16000)

    assert out.dtype == np.float32 and len(out) == round(len(tone(7000, rate)) * 16000 / rate)
    assert 20 * np.log10(rms(out) / rms(tone(7000, rate))) == pytest.approx(0, abs=0.1)  # dB


@pytest.mark.parametrize("rate", [44100, 48000, 22050])
def test_resampling_removes_a_tone_above_the_new_nyquist(rate):
    # 9 kHz cannot be represented at 16 kHz: what is left of it is aliasing, and must be 60 dB down
    out = resample(tone(9000, rate), rate, 16000)

    assert 20 * np.log10(rms(out) / rms(tone(9000, rate))) < -60
