"""Query tokens from a clip id, a video file or an audio file, for `SearchIndex.search`.

A clip id is looked up in the index (`SearchIndex.clip_tokens`). Files are embedded through the
embedding API (`avsync.api.load`) with the settings the gallery was embedded with, which `index.json`
records (checkpoint, alignment, frame count). The model must be the gallery's: `index.json` records its
absolute path and the digest of its weights, and a model with another digest is refused, wherever the
search runs from and whatever `--ckpt` names.

- a video file: `AVSyncModel.embed_video`, exactly the path of `avsync embed`; its `video` tokens, or
  its `audio` tokens when the query modality is audio.
- an audio file (wav, mp3, m4a... or any container with an audio stream): the soundtrack half of that
  path - the same decoder (`decode_audio`, mono 16 kHz), spectrogram (stored as float16, as `prepare`
  stores it) and per-frame windows (`model.reader`'s own `AudioWindows`) - with the clip's duration
  taken from the sound, then `AVSyncModel.embed(audio=...)`. The soundtrack of a video given as an
  audio file therefore embeds exactly as that video's audio.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from avsync.search.index import SearchError, SearchIndex

log = logging.getLogger(__name__)


def query_model(index: SearchIndex, checkpoint: str | None = None, device: str = "auto", precision=None):
    """The model that embedded the gallery (or `checkpoint`), set up as the embedding run was; refused
    unless its weights digest is the one `index.json` records (when it records one)."""
    from avsync.api import load
    from avsync.data.clip import ExtractionOptions

    facts = index.facts.get("model", {})
    recorded = facts.get("checkpoint")
    if not checkpoint and not recorded:
        raise SearchError(
            f"{index.directory}: its index.json records no checkpoint; give the model the gallery was "
            "embedded with (--ckpt)"
        )
    if not checkpoint and not Path(recorded).is_absolute():  # written before paths were made absolute
        raise SearchError(
            f"{index.directory}: its index.json records the checkpoint as {recorded!r}, relative to "
            "wherever the gallery was embedded; give the model the gallery was embedded with (--ckpt)"
        )
    checkpoint = checkpoint or recorded
    extraction = ExtractionOptions(num_frames=index.steps)
    model = load(checkpoint, device, precision, alignment=facts.get("alignment"), extraction=extraction)
    if model.backbone.embed_dim != index.dim:
        raise SearchError(
            f"{checkpoint}: dimension mismatch: the model embeds {model.backbone.embed_dim} dimensions, the "
            f"index {index.directory} holds {index.dim}; give the model the gallery was embedded with"
        )
    expected = facts.get("weights_digest")
    if expected is None:
        log.warning(
            "%s records no weights digest (built from an older embedding): %s cannot be checked to be "
            "the model the gallery was embedded with",
            index.directory,
            checkpoint,
        )
    elif model.weights_digest != expected:
        raise SearchError(
            f"{checkpoint}: not the model the gallery of {index.directory} was embedded with (weights "
            f"digest {model.weights_digest[:16]}..., index.json records {expected[:16]}...); its scores "
            "would not compare: give that model (--ckpt), or index a gallery embedded with this one"
        )
    return model


def video_file_tokens(model, path: str | Path, modality: str) -> np.ndarray:
    """`(T, D)` tokens of a video file: its frames (`video`) or its soundtrack (`audio`)."""
    embedding = model.embed_video(path)
    return getattr(embedding, modality).numpy()


def audio_windows(model, path: str | Path):
    """The model's `(T, L, mel)` audio input for a sound file (`DecodeError` naming the file)."""
    import torch

    from avsync.data.audio import decode_audio
    from avsync.data.clip import check_duration
    from avsync.data.fbank import log_mel_fbank
    from avsync.data.media import open_media

    options = model.reader.options
    with open_media(path) as container:
        waveform = decode_audio(
            container, path, options.fbank.sample_rate, options.mono, options.max_duration
        )
    check_duration(path, waveform.duration, options)
    spectrogram = log_mel_fbank(waveform.samples, options.fbank).numpy().astype(np.float16)
    return model.reader.decoder.audio_windows.windows(torch.from_numpy(spectrogram).float())


def audio_file_tokens(model, path: str | Path) -> np.ndarray:
    """`(T, D)` audio tokens of a sound file."""
    return model.embed(audio=audio_windows(model, path)).audio.cpu().numpy()
