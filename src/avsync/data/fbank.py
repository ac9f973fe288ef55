"""The clip spectrogram of SPEC §1: a Kaldi-compatible log-Mel filterbank of the DC-free mono waveform.

The parameters are the authors' (`torchaudio.compliance.kaldi.fbank` with `htk_compat`, 128 bins,
25-ms Hanning window, 10-ms shift, no energy, no dither); they are a dataclass so that `prepare` can
write every one of them into the manifest.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torchaudio.compliance import kaldi


@dataclass(frozen=True)
class FbankConfig:
    sample_rate: int = 16000
    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    window_type: str = "hanning"
    htk_compat: bool = True
    use_energy: bool = False
    dither: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def remove_dc(samples: np.ndarray | torch.Tensor) -> torch.Tensor:
    """`(1, N)` float32 waveform minus its mean. The mean is summed in float64 by numpy: torch's float32
    reduction changes in the last bit with the number of threads, and the output must not."""
    waveform = np.asarray(samples, dtype=np.float32).reshape(1, -1)
    return torch.from_numpy(waveform - np.float32(waveform.mean(dtype=np.float64)))


def log_mel_fbank(samples: np.ndarray | torch.Tensor, config: FbankConfig = FbankConfig()) -> torch.Tensor:
    """`(S, num_mel_bins)` float32 log-Mel frames of a mono waveform (`(N,)`, at `config.sample_rate`).

    The waveform's mean is removed first (SPEC: "DC removed"), as the authors did before calling Kaldi.
    Computed on one thread so that the result is bit-identical whatever the machine's thread count
    (`prepare` promises the same bytes for the same input). A waveform shorter than one analysis
    window gives `S = 0`.
    """
    with _single_thread():
        return kaldi.fbank(
            remove_dc(samples),
            sample_frequency=config.sample_rate,
            num_mel_bins=config.num_mel_bins,
            frame_length=config.frame_length_ms,
            frame_shift=config.frame_shift_ms,
            window_type=config.window_type,
            htk_compat=config.htk_compat,
            use_energy=config.use_energy,
            dither=config.dither,
        )


@contextmanager
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
