"""What the app shows of one clip, computed once per upload: the paper's aligned frame/window pairs,
their sound-prompted maps, the temporal segmentation, and the query tokens for search.

Everything the map selector or the control switch can ask for is derived from tensors kept here, so
changing either only recombines them (`maps`), it never decodes or encodes the clip again.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from avsync.api.model import AVSyncModel
from avsync.app.render import read_sound
from avsync.data.errors import DecodeError
from avsync.data.media import open_media, probe
from avsync.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from avsync.model.patch_readout import video_patch_features
from avsync.tasks.localization import similarity_maps
from avsync.tasks.segmentation import ClipFeatures, VideoSegmentation, segment_clip

#: The maps the selector offers: label -> (patch readout, prompt surgery). The paper's map first.
MAP_KINDS: dict[str, tuple[str, bool]] = {
    "the paper's map": ("patch_tokens", False),
    "global readout + prompt surgery": ("global_readout", True),
}


@dataclass(frozen=True)
class InputLimits:
    """What an upload may be. Longer clips are cut (not refused) to `max_seconds`, stated in the page."""

    max_seconds: float = 20.0
    min_seconds: float = 2.0
    max_bytes: int = 200 * 2**20


class InputProblem(ValueError):
    """An upload the app cannot analyse, in words for the page (never a stack trace)."""


@dataclass
class ClipAnalysis:
    """One clip as the model sees it, with everything the tabs show.

    `frames` are the model's 16 input frames (RGB uint8, S x S); `prompts` the normalized global audio
    token of each frame's own window; `patches[readout]` the normalized per-patch features, computed
    when first asked for; `note` says what was done to the input (cut, kept as is).
    """

    name: str
    duration: float
    frame_times: list[float]
    frames: np.ndarray  # (T, S, S, 3) uint8
    prompts: torch.Tensor  # (T, D), unit norm
    global_video: torch.Tensor  # (T, D), unit norm
    audio_tokens: np.ndarray  # (T, D) global audio tokens as `avsync embed` stores them (search queries)
    video_tokens: np.ndarray  # (T, D)
    fbank: np.ndarray  # (S, mel) the clip's spectrogram (for the segmentation figure)
    sound: np.ndarray  # mono waveform at `render.AUDIO_RATE` (what the overlay video plays)
    segmentation: VideoSegmentation
    boundary_scores: list[float]  # 1 - cos between consecutive audio-visual features
    note: str
    source_path: str
    grid: tuple[int, int]
    _model: AVSyncModel = field(repr=False)
    _video: torch.Tensor = field(repr=False)  # normalized model inputs, kept for the readouts
    patches: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    maps_computed: int = 0  # how many map sets were computed (a test checks the cache)

    def patch_features(self, readout: str) -> torch.Tensor:
        if readout not in self.patches:
            with torch.no_grad():
                features = video_patch_features(self._model.backbone, self._video, readout)
            self.patches[readout] = F.normalize(features.float(), dim=-1)
        return self.patches[readout]

    def maps(
        self, kind: str, prompts: torch.Tensor | None = None, shared_prompt: torch.Tensor | None = None
    ) -> np.ndarray:
        """`(T, h, w)` maps of `kind` (a `MAP_KINDS` label), each frame prompted with `prompts[t]` (default:
        its own window). Surgery subtracts `shared_prompt` (default: the mean of this clip's prompts
        and the other prompts given)."""
        readout, surgery = MAP_KINDS[kind]
        prompts = self.prompts if prompts is None else prompts
        shared = None
        if surgery:
            shared = (
                shared_prompt if shared_prompt is not None else torch.cat([self.prompts, prompts]).mean(0)
            )
        self.maps_computed += 1
        return similarity_maps(prompts, self.patch_features(readout), self.grid, shared).numpy()


def check_upload(path: str | Path, limits: InputLimits) -> tuple[float, bool]:
    """(duration, has_audio) of an upload, or `InputProblem` saying in words what is wrong with it."""
    path = Path(path)
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise InputProblem(
            f"{path.name} is {size / 2**20:.0f} MiB; the app takes files up to "
            f"{limits.max_bytes / 2**20:.0f} MiB"
        )
    try:
        with open_media(path) as container:
            info = probe(container, path)
    except DecodeError as error:
        raise InputProblem(f"{path.name} is not a video the app can read: {error.reason}") from None
    if not info.has_audio:
        raise InputProblem(
            f"{path.name} has no audio track: the maps and segments are prompted by the clip's own sound"
        )
    duration = float(info.duration)
    if duration < limits.min_seconds:
        raise InputProblem(
            f"{path.name} lasts {duration:.2f} s; the model needs at least {limits.min_seconds:g} s "
            "(16 frames, each with its own audio window)"
        )
    return duration, info.has_audio


def cut_to(path: str | Path, seconds: float, directory: str | Path) -> Path:
    """The first `seconds` of `path`, remuxed without re-encoding (packets before the cut, in order)."""
    out = Path(directory) / f"{Path(path).stem}-first{seconds:g}s.mkv"
    with open_media(path) as source, av.open(os.fspath(out), "w") as target:
        streams = [s for s in (*source.streams.video[:1], *source.streams.audio[:1])]
        mapped = {s.index: target.add_stream_from_template(s) for s in streams}
        start = {s.index: s.start_time or 0 for s in streams}
        for packet in source.demux(streams):
            if packet.dts is None or packet.pts is None:
                continue
            stream = packet.stream
            if float((packet.pts - start[stream.index]) * stream.time_base) >= seconds:
                continue
            packet.stream = mapped[stream.index]
            target.mux(packet)
    return out


def analyze(
    model: AVSyncModel, path: str | Path, limits: InputLimits = InputLimits(), name: str | None = None
) -> ClipAnalysis:
    """Decode, encode and segment one uploaded clip (cut to `limits.max_seconds` when longer)."""
    duration, _ = check_upload(path, limits)
    note = f"{duration:.1f} s, analysed whole"
    with tempfile.TemporaryDirectory(prefix="avsync-app-") as scratch:
        source = Path(path)
        if duration > limits.max_seconds:
            source = cut_to(path, limits.max_seconds, scratch)
            note = f"{duration:.1f} s long: the first {limits.max_seconds:g} s are analysed"
        try:
            inputs = model.read_video(source)
            sound = read_sound(source, limits.max_seconds + 1)
        except DecodeError as error:
            raise InputProblem(f"{Path(path).name}: {error.reason}") from None
    with torch.no_grad():
        embedded = model.embed(inputs.audio, inputs.video, patches=True)
    prompts = F.normalize(embedded.audio.float().cpu(), dim=-1)
    global_video = F.normalize(embedded.video.float().cpu(), dim=-1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = ((inputs.video.float() * std + mean).clamp(0, 1) * 255).round().byte()
    frames = pixels.permute(0, 2, 3, 1).numpy()
    features = ClipFeatures(
        name=name or Path(path).stem,
        audio=prompts.numpy(),
        video=global_video.numpy(),
        frames=list(frames),
        fbank=inputs.fbank if inputs.fbank is not None else np.zeros((1, 128), np.float32),
        duration=min(duration, limits.max_seconds),
    )
    segmentation = segment_clip(features)
    joint = np.concatenate([features.audio, features.video], axis=1) / np.sqrt(2)
    boundary = [float(1 - joint[t] @ joint[t + 1]) for t in range(len(joint) - 1)]
    return ClipAnalysis(
        name=features.name,
        duration=features.duration,
        frame_times=[float(t) for t in inputs.metadata["frame_times"]],
        frames=frames,
        prompts=prompts,
        global_video=global_video,
        audio_tokens=embedded.audio.float().cpu().numpy(),
        video_tokens=embedded.video.float().cpu().numpy(),
        fbank=features.fbank,
        sound=sound,
        segmentation=segmentation,
        boundary_scores=boundary,
        note=note,
        source_path=str(path),
        grid=model.backbone.video_tokenizer.grid,
        _model=model,
        _video=inputs.video.to(model.device, torch.float32),
        patches={"patch_tokens": F.normalize(embedded.video_patches.float(), dim=-1)},  # the paper's map
    )
