"""A synthetic gallery of clustered audio-visual embeddings, regenerable chunk by chunk.

An index of a million clips cannot be measured on uniform noise: random unit vectors in 12,288
dimensions are all nearly orthogonal, so "nearest neighbours" are arbitrary and no index structure
helps or hurts. Real embeddings are clustered (categories), anisotropic (a few directions carry most
of the variance), and the tokens of one clip are strongly correlated over time. This generator builds
all three in, with every parameter stated (`ClusteredGallery`); nothing is tuned to an index.

A clip `i` of cluster `k`, frame `t`, modality `m` (audio or video), before per-frame L2 normalization:

    centre[k] + offset[i] + sum_j bump_j(t) event[i, j] + modality[m, i] + noise[m, i, t]

- `centre[k]`: a random unit direction (isotropic over D); clusters have Zipf-like sizes.
- `offset[i]`, `event[i, j]`, `modality[m, i]`: draws of one anisotropic distribution over D whose j-th
  principal variance falls as `j ** -spectrum_exponent` (the power-law spectra of trained features),
  scaled so that their expected norms are the `*_scale` parameters. Its principal axes are the
  coordinate axes: the centres and the noise are isotropic, so a random basis would only rotate the
  whole gallery, which changes no inner product (and an index sees the data through a learned PCA).
- `bump_j(t)`: a Gaussian bump over time (random centre and width) - an audio-visual event, shared by
  both modalities (what a synchronized model aligns frame by frame).
- `noise`: isotropic per frame and modality (`noise_scale` expected norm).

Every chunk of `chunk_size` clips is drawn from its own seeds (`seed`, chunk, stream), so any chunk can
be regenerated alone, in any order, and a modality without the other: the streams are the clip's
shared content (cluster, offset, events), then each modality's own content and noise. Draws use
`torch.randn` (fast on a CPU; deterministic for a given PyTorch version).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np
import torch

MODALITIES = ("audio", "video")
_SHARED, _MODALITY_STREAM = 0, {"audio": 1, "video": 2}


@dataclass(frozen=True)
class ClusteredGallery:
    """The generator's parameters (the module docstring says what each component is).

    Args:
        num_clips: clips in the gallery.
        steps / dim: T tokens of D per clip and modality (the model's 16 x 768).
        clusters: categories; cluster `k` holds a share proportional to `(k + 1) ** -cluster_exponent`
            (0.5: the largest is about 30 times the smallest, a long tail like AudioSet's labels).
        spectrum_exponent: per-clip components have principal variances `j ** -spectrum_exponent`
            (1.0: an effective dimension of about 32 of 768).
        offset_scale: how far a clip lies from its category's centre (1.0: as far as the centre from 0,
            so two clips of one category have a cosine of about 0.5 before time and modality enter).
        events / event_scale / event_width: audio-visual events per clip, their size at their peak
            frame, and the range of their Gaussian widths in frames.
        modality_scale: what one modality has that the other has not (a clip's sound vs its picture).
        noise_scale: per-frame, per-modality isotropic noise (0.5: about a tenth of a frame's energy;
            frames of one clip keep a cosine of about 0.85).
        chunk_size: clips per independently seeded chunk.
        seed: the gallery; the same parameters and seed give the same gallery.
    """

    num_clips: int = 1_000_000
    steps: int = 16
    dim: int = 768
    clusters: int = 1000
    cluster_exponent: float = 0.5
    spectrum_exponent: float = 1.0
    offset_scale: float = 1.0
    events: int = 3
    event_scale: float = 0.7
    event_width: tuple[float, float] = (1.0, 3.0)
    modality_scale: float = 0.7
    noise_scale: float = 0.5
    chunk_size: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.num_clips, self.steps, self.dim, self.clusters, self.chunk_size) < 1:
            raise ValueError(f"sizes must be positive: {self}")

    def parameters(self) -> dict:
        """JSON-ready parameters (written beside every measurement made on this gallery)."""
        return {**asdict(self), "event_width": list(self.event_width)}

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_clips / self.chunk_size)

    def chunk_rows(self, index: int) -> range:
        """The gallery rows (clip numbers) of chunk `index`."""
        if not 0 <= index < self.num_chunks:
            raise IndexError(f"chunk {index} of a gallery of {self.num_chunks} chunks")
        start = index * self.chunk_size
        return range(start, min(start + self.chunk_size, self.num_clips))

    # ------------------------------------------------------------------ fixed for the whole gallery
    def _generator(self, *stream: int) -> torch.Generator:
        entropy = np.random.SeedSequence([self.seed, *stream]).generate_state(2, dtype=np.uint64)
        return torch.Generator().manual_seed(int(entropy[0] >> np.uint64(1)))

    @cached_property
    def _fixed(self) -> dict[str, torch.Tensor]:
        generator = self._generator(2**31)
        centres = torch.randn(self.clusters, self.dim, generator=generator)
        centres /= centres.norm(dim=1, keepdim=True)
        variances = torch.arange(1, self.dim + 1, dtype=torch.float64) ** -self.spectrum_exponent
        shares = torch.arange(1, self.clusters + 1, dtype=torch.float64) ** -self.cluster_exponent
        return {
            "centres": centres,
            "deviations": (variances / variances.sum()).sqrt().float(),  # z * this: E|.|^2 = 1
            "shares": shares / shares.sum(),
        }

    def _anisotropic(self, count: int, scale: float, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(count, self.dim, generator=generator).mul_(self._fixed["deviations"] * scale)

    # ------------------------------------------------------------------ chunks
    def chunk(self, index: int, modalities: tuple[str, ...] = MODALITIES) -> dict[str, np.ndarray]:
        """`{modality: (n, T, D) float32}` per-frame unit tokens of chunk `index`, plus `clusters (n,)`."""
        unknown = set(modalities) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; choose from {MODALITIES}")
        count = len(self.chunk_rows(index))
        shared = self._shared(index, count)
        out: dict[str, np.ndarray] = {"clusters": shared["clusters"].numpy()}
        for modality in modalities:
            generator = self._generator(index, _MODALITY_STREAM[modality])
            own = self._anisotropic(count, self.modality_scale, generator)
            noise = torch.randn(count, self.steps, self.dim, generator=generator)
            tokens = noise.mul_(self.noise_scale / math.sqrt(self.dim))
            tokens += shared["content"]
            tokens += own[:, None]
            tokens /= tokens.norm(dim=-1, keepdim=True)
            out[modality] = tokens.numpy()
        return out

    def _shared(self, index: int, count: int) -> dict[str, torch.Tensor]:
        """What both modalities of the chunk's clips show: the category, the clip, its events."""
        generator = self._generator(index, _SHARED)
        fixed = self._fixed
        clusters = torch.multinomial(fixed["shares"], count, replacement=True, generator=generator)
        clip = fixed["centres"][clusters] + self._anisotropic(count, self.offset_scale, generator)
        events = self._anisotropic(count * self.events, self.event_scale, generator)
        centre_times = torch.rand(count, self.events, 1, generator=generator) * self.steps
        low, high = self.event_width
        widths = low + (high - low) * torch.rand(count, self.events, 1, generator=generator)
        times = torch.arange(self.steps, dtype=torch.float32)
        bumps = torch.exp(-0.5 * ((times - centre_times) / widths) ** 2)  # (n, events, T)
        content = torch.bmm(bumps.transpose(1, 2), events.view(count, self.events, self.dim))
        content += clip[:, None]
        return {"clusters": clusters, "content": content}

    # ------------------------------------------------------------------ as an index source
    # (`avsync.search.index.Source`: what `build_index` reads)
    modalities = MODALITIES

    @property
    def metadata(self) -> dict:
        return {}

    @cached_property
    def ids(self) -> np.ndarray:
        """`synthetic-0000042`: clip ids in row order."""
        return np.char.add("synthetic-", np.char.zfill(np.arange(self.num_clips).astype(str), 7))

    def describe(self) -> dict:
        return {"kind": "synthetic", "num_clips": self.num_clips, "generator": self.parameters()}

    def chunks(
        self, size: int = 0, modalities: tuple[str, ...] | None = None
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """`(first row, {modality: tokens})` per generated chunk (`chunk_size` clips; `size` is ignored:
        a chunk is the unit that can be regenerated)."""
        for index in range(self.num_chunks):
            chunk = self.chunk(index, tuple(modalities or MODALITIES))
            chunk.pop("clusters")
            yield self.chunk_rows(index).start, chunk

    def tokens(self, modality: str, rows) -> np.ndarray:
        return self.clips(rows, modality)

    def sample_rows(self, count: int, seed: int = 0) -> np.ndarray:
        """The first `count` clips: every clip is an independent draw, so the first ones are a random
        sample, and the cheapest to generate."""
        return np.arange(min(count, self.num_clips))

    def clips(self, rows: np.ndarray | list[int], modality: str) -> np.ndarray:
        """The tokens `(len(rows), T, D)` of some clips (their chunks regenerated)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.steps, self.dim), dtype=np.float32)
        for index in np.unique(rows // self.chunk_size):
            mine = np.flatnonzero(rows // self.chunk_size == index)
            tokens = self.chunk(int(index), (modality,))[modality]
            out[mine] = tokens[rows[mine] - index * self.chunk_size]
        return out
