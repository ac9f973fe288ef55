"""`avsync.load(path)`: a trained backbone, ready to embed tensors or video files.

Embeddings are the per-time-step global tokens (`(T, D)` per modality: what retrieval and
classification use) and, when asked, the patch tokens (`(T, N, D)`: what localization uses). Inference
runs under `torch.no_grad` (not `inference_mode`, whose tensors cannot later feed a trainable head); on
a GPU the default precision is bf16 autocast, and the outputs are always float32.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from avsync.api.videos import Failure, VideoFiles, VideoInputs, VideoReader
from avsync.checkpoints import is_backbone_export, is_export_description, load_backbone, save_backbone
from avsync.data.alignment import AlignmentMode, default_alignment
from avsync.data.clip import ExtractionOptions
from avsync.kernels import use_kernels
from avsync.model import CAVMAESync
from avsync.output_paths import check_output_file

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16")


@dataclass
class Embedding:
    """Per-time-step embeddings; leading dims follow the input (`(T,)` for a clip, `(B, T)` for a batch).

    `audio`, `video` `(..., D)`: global tokens; `audio_patches` `(..., N_audio, D)`, `video_patches`
    `(..., N_video, D)`: normalized patch tokens of the same pass (None unless asked for). A modality
    that was not given is None.
    """

    audio: torch.Tensor | None
    video: torch.Tensor | None
    audio_patches: torch.Tensor | None = None
    video_patches: torch.Tensor | None = None


@dataclass(kw_only=True)
class VideoEmbedding(Embedding):
    """The embeddings of one video file (float32, on the CPU): `audio`/`video` `(T, D)`, plus where they
    come from: `key` (the clip id, the file name without extension, as `prepare` names it), `path`,
    `frame_times` (s, the frames actually decoded) and the decoder's `metadata`."""

    key: str
    path: str
    frame_times: list[float]
    metadata: dict


@dataclass
class EmbeddingRun:
    """What `embed_videos` made: the embeddings of the videos that decoded, in input order, and the
    failures (path and reason) of those that did not - never a placeholder in their place."""

    embeddings: list[VideoEmbedding] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        return [e.key for e in self.embeddings]

    @property
    def audio(self) -> torch.Tensor:
        """`(N, T, D)`: ready for `avsync.evaluation.retrieval.evaluate_all(run.audio, run.video)`."""
        return torch.stack([e.audio for e in self._embedded()])

    @property
    def video(self) -> torch.Tensor:
        return torch.stack([e.video for e in self._embedded()])

    def _embedded(self) -> list[VideoEmbedding]:
        """The embeddings, or an error that says why there are none (not torch's "non-empty TensorList")."""
        if not self.embeddings:
            reasons = "; ".join(f"{failure.path}: {failure.reason}" for failure in self.failures[:3])
            more = f" (and {len(self.failures) - 3} more)" if len(self.failures) > 3 else ""
            raise ValueError(
                f"no video could be embedded, so there is nothing to stack: {reasons}{more}"
                if self.failures
                else "no videos were given to embed"
            )
        return self.embeddings


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None`/`"auto"`: the GPU when there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but CUDA is not available here (use 'cpu' or 'auto')")
    return device


def resolve_precision(precision: Precision | None, device: torch.device) -> Precision:
    """`None`: bf16 autocast on a GPU (the paper's precision), fp32 elsewhere."""
    if precision is None:
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (or None for automatic), got {precision!r}")
    return precision


class AVSyncModel:
    """A backbone in eval mode on one device, with the decoding that turns video files into its inputs.

    Args:
        backbone: the model (moved to `device`, gradients off).
        device: `"cuda"`, `"cpu"`, a `torch.device`, or None for the GPU when there is one.
        precision: `"bf16"` (autocast) or `"fp32"`; None: bf16 on a GPU, fp32 elsewhere.
        alignment: frame-to-window alignment (SPEC §1); None: `clip`, or `authors` for a model with
            1024-frame windows (original CAV-MAE), which then sees the whole clip with every frame.
        extraction: decoding options (frames per clip, accepted durations, ...), as for `prepare`.
        source: where the weights came from (reported in outputs; `load` gives the absolute path).
    """

    def __init__(
        self,
        backbone: CAVMAESync,
        device: str | torch.device | None = None,
        precision: Precision | None = None,
        *,
        alignment: AlignmentMode | None = None,
        extraction: ExtractionOptions | None = None,
        source: str | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        # CPU: the linear and attention kernels measured fastest on this host (avsync.kernels)
        self.backbone = use_kernels(backbone.eval().requires_grad_(False).to(self.device))
        self.alignment = alignment or default_alignment(backbone.audio_length)
        self.reader = VideoReader(
            backbone.image_size, backbone.audio_length, self.alignment, extraction or ExtractionOptions()
        )
        self.source = source
        self._weights_digest: str | None = None

    @property
    def weights_digest(self) -> str:
        """SHA-256 of the backbone's config and weights (`avsync.tasks.probe.features.fingerprint`): what
        identifies the model behind embeddings, wherever its file lies and whatever its format."""
        if self._weights_digest is None:
            from avsync.tasks.probe.features import fingerprint

            self._weights_digest = fingerprint(self.backbone)
        return self._weights_digest

    @property
    def num_frames(self) -> int:
        """T: frame / audio-window pairs per video."""
        return self.reader.options.num_frames

    def describe(self) -> dict:
        """JSON-ready facts about this model and how it embeds (written beside every output)."""
        return {
            "checkpoint": self.source,
            "weights_digest": self.weights_digest,
            "backbone_config": dict(self.backbone.config),
            "embed_dim": self.backbone.embed_dim,
            "num_frames": self.num_frames,
            "alignment": self.alignment,
            "image_size": self.backbone.image_size,
            "audio_length": self.backbone.audio_length,
            "precision": self.precision,
            "device": str(self.device),
            "extraction": self.reader.options.as_dict(),
        }

    # ------------------------------------------------------------------ tensors
    @contextmanager
    def _inference(self) -> Iterator[None]:
        with (
            torch.no_grad(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"),
        ):
            yield

    def embed(
        self, audio: torch.Tensor | None = None, video: torch.Tensor | None = None, *, patches: bool = False
    ) -> Embedding:
        """Embeddings of normalized inputs: `audio (T, L, mel)` / `video (T, 3, H, W)` for one clip, or
        `(B, T, ...)` for a batch; either may be None. Float32 results on this model's device."""
        with self._inference():
            out = self.backbone.encode(self._on_device(audio), self._on_device(video))
        return Embedding(
            audio=_float(out.global_audio),
            video=_float(out.global_video),
            audio_patches=_float(out.patches_audio) if patches else None,
            video_patches=_float(out.patches_video) if patches else None,
        )

    def _on_device(self, x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else torch.as_tensor(x).to(self.device, torch.float32)

    # ------------------------------------------------------------------ video files
    def read_video(self, path: str | Path) -> VideoInputs:
        """The model's inputs for a video file (`DecodeError` naming the file if it cannot be used)."""
        return self.reader(path)

    def embed_video(self, path: str | Path, *, patches: bool = False) -> VideoEmbedding:
        """The `T` per-time-step embeddings of one video file; raises `DecodeError` if it cannot be read."""
        return self._embed_decoded([self.read_video(path)], patches)[0]

    def embed_videos(
        self,
        paths: Sequence[str | Path],
        *,
        patches: bool = False,
        batch_size: int = 8,
        num_workers: int = 0,
        progress: bool = False,
    ) -> EmbeddingRun:
        """Embed many video files, `batch_size` clips per forward pass, decoding in `num_workers`
        processes (0: in this one) while the model runs. A video that cannot be read is logged and
        listed in `failures`; the others are embedded all the same."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers > 0:
            # Decoder objects of earlier (failed) decodes may await collection; freed in a forked worker,
            # a PyAV codec context joins threads that do not exist there and the worker crashes.
            gc.collect()
        loader = DataLoader(
            VideoFiles(paths, self.reader),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=list,
        )
        run = EmbeddingRun()
        with tqdm(total=len(paths), unit="video", disable=not progress) as bar:
            for batch in loader:
                decoded = [item for item in batch if isinstance(item, VideoInputs)]
                for failure in (item for item in batch if isinstance(item, Failure)):
                    log.warning("skipped %s: %s", failure.path, failure.reason)
                    run.failures.append(failure)
                if decoded:
                    run.embeddings += self._embed_decoded(decoded, patches)
                bar.update(len(batch))
        return run

    def _embed_decoded(self, clips: list[VideoInputs], patches: bool) -> list[VideoEmbedding]:
        out = self.embed(
            torch.stack([c.audio for c in clips]), torch.stack([c.video for c in clips]), patches=patches
        )
        batch = {name: None if value is None else value.cpu() for name, value in vars(out).items()}
        return [
            VideoEmbedding(
                **{name: None if value is None else value[i] for name, value in batch.items()},
                key=clip.key,
                path=clip.path,
                frame_times=list(clip.metadata["frame_times"]),
                metadata=clip.metadata,
            )
            for i, clip in enumerate(clips)
        ]


def _float(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.float()


def load(
    path: str | Path,
    device: str | torch.device | None = None,
    precision: Precision | None = None,
    *,
    alignment: AlignmentMode | None = None,
    extraction: ExtractionOptions | None = None,
    **authors_kwargs,
) -> AVSyncModel:
    """A trained model from any checkpoint avsync reads: a Lightning checkpoint of any avsync task, an
    avsync safetensors export, the authors' CAV-MAE Sync release or an original CAV-MAE checkpoint
    (`authors_kwargs`: the authors' constructor arguments the weights cannot reveal, e.g. `num_heads`).

    Every file is read without executing code (`weights_only` pickle or safetensors).
    """
    backbone = load_backbone(path, **authors_kwargs)
    source = str(Path(path).resolve())  # outputs name the file wherever they are read from
    return AVSyncModel(backbone, device, precision, alignment=alignment, extraction=extraction, source=source)


def check_export_out(out: str | Path, checkpoint: str | Path, json_sidecar: bool = False) -> Path:
    """`out` (and with `json_sidecar` its `.json` twin) as the files of `avsync export`, before the
    checkpoint is read: not the checkpoint, not a folder, and when present earlier avsync exports."""
    out = check_output_file(
        out,
        inputs=[checkpoint],
        ours=is_backbone_export,
        what="an avsync safetensors export (its metadata holds avsync_backbone_config)",
        flag="OUT",
    )
    if json_sidecar:
        check_output_file(
            out.with_suffix(".json"),
            inputs=[checkpoint],
            ours=is_export_description,
            what="the JSON description of an avsync export (with avsync_backbone_config)",
            flag="--json file",
        )
    return out


def export(checkpoint: str | Path, out: str | Path, *, json_sidecar: bool = False, **authors_kwargs) -> Path:
    """Convert any checkpoint `load` reads into an avsync safetensors export at `out` (`.safetensors`):
    the backbone's weights plus its config in the file's metadata (and in `out.json` with
    `json_sidecar`). Loading the export gives a model with bit-identical outputs. An existing `out` is
    replaced only when it is an earlier export (`check_export_out`)."""
    check_export_out(out, checkpoint, json_sidecar)
    return save_backbone(
        load_backbone(checkpoint, **authors_kwargs),
        out,
        source=Path(checkpoint).name,
        json_sidecar=json_sidecar,
    )
