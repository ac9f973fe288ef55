"""Opening a media file and reading what its container says about it, with errors that name the problem.

Everything here works on container metadata and packet headers; nothing is decoded. Times are exact
`Fraction`s of a second so that frame selection can compare timestamps without rounding trouble.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.container
import av.logging

from avsync.data.errors import DecodeError

#: ffmpeg's container-level time unit (AV_TIME_BASE).
_CONTAINER_TIME_BASE = Fraction(1, 1_000_000)


@dataclass(frozen=True)
class MediaInfo:
    """What a clip's container declares. `duration` is the video stream's (SPEC §1 spreads the frames
    over it); `video_start` is its first presentation time, the origin of every frame time."""

    duration: Fraction
    video_start: Fraction
    fps: float | None
    width: int
    height: int
    has_audio: bool
    audio_start: Fraction | None
    audio_sample_rate: int | None
    audio_channels: int | None


def check_readable(path: str | Path) -> None:
    """Fail early, with the file's actual problem, before ffmpeg turns it into a generic error."""
    path = Path(path)
    try:
        status = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise DecodeError(
                path, f"broken symbolic link (to {os.readlink(path)}, which does not exist)"
            ) from None
        raise DecodeError(path, "no such file") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise DecodeError(path, "symlink loop (a symbolic link that leads back to itself)") from None
        if isinstance(error, PermissionError):
            raise DecodeError(path, "unreadable (permission denied on its directory)") from None
        raise DecodeError(path, f"cannot be read: {error.strerror or error}") from None
    if stat.S_ISDIR(status.st_mode):
        raise DecodeError(path, "not a regular file (a directory)")
    if not stat.S_ISREG(status.st_mode):
        raise DecodeError(path, "not a regular file (a device, pipe or socket)")
    if not os.access(path, os.R_OK):
        raise DecodeError(path, "unreadable (permission denied)")
    if status.st_size == 0:
        raise DecodeError(path, "empty file (0 bytes)")


def open_media(path: str | Path) -> av.container.InputContainer:
    """Open `path` for demuxing; a file ffmpeg cannot parse is reported as not media or truncated,
    with ffmpeg's own last error line (e.g. "moov atom not found") when it gave one."""
    check_readable(path)
    with _ffmpeg_log_captured() as logs:
        try:
            # an absolute path: ffmpeg reads a leading `name:` as a protocol (`concat:`, `http:`, ...)
            return av.open(os.path.abspath(path), mode="r")
        except av.FFmpegError as error:
            detail = error.strerror or str(error)
            errors = [message.strip() for level, _, message in logs if level <= av.logging.ERROR]
            if errors:
                detail += f" ({errors[-1]})"
            raise DecodeError(
                path, f"not a readable media container (not audio/video, or truncated): {detail}"
            ) from error


@contextmanager
def _ffmpeg_log_captured() -> Iterator[list]:
    """Collect ffmpeg's error lines in a list (instead of printing them) for the duration of the block.

    ffmpeg only reports errors once PyAV's log level admits them, and PyAV drops a message equal to
    the previous one; for the block the level is raised to ERROR (when lower) and repeats are kept.
    """
    previous, skip_repeated = av.logging.get_level(), av.logging.get_skip_repeated()
    if previous is None or previous < av.logging.ERROR:
        av.logging.set_level(av.logging.ERROR)
    av.logging.set_skip_repeated(False)
    try:
        with av.logging.Capture(local=True) as logs:
            yield logs
    finally:
        av.logging.set_level(previous)
        av.logging.set_skip_repeated(skip_repeated)


def probe(container: av.container.InputContainer, path: str | Path) -> MediaInfo:
    """Duration, timing and stream properties of an opened clip. Needs a video stream."""
    if not container.streams.video:
        raise DecodeError(path, "no video stream")
    video = container.streams.video[0]
    if video.time_base is None:
        raise DecodeError(path, "video stream has no time base")
    video_start = _stream_start(container, video)
    duration = _video_duration(container, video, video_start)
    if duration is None:
        raise DecodeError(path, "video duration unknown (no stream or container duration, no timestamps)")
    if duration <= 0:
        raise DecodeError(path, "zero-length video")
    rate = video.average_rate or video.guessed_rate
    audio = container.streams.audio[0] if container.streams.audio else None
    return MediaInfo(
        duration=duration,
        video_start=video_start,
        fps=float(rate) if rate else None,
        width=video.codec_context.width,
        height=video.codec_context.height,
        has_audio=audio is not None,
        audio_start=_stream_start(container, audio) if audio is not None else None,
        audio_sample_rate=audio.codec_context.sample_rate if audio is not None else None,
        audio_channels=audio.codec_context.channels if audio is not None else None,
    )


def rewind(container: av.container.InputContainer, stream: av.stream.Stream, path: str | Path) -> None:
    """Put the demuxer back at `stream`'s first packet, so that a container already read (for a clip's
    frames) decodes the stream as a freshly opened one would.

    A seek to 0 is not that: it is a seek of the video stream, which leaves out the audio packets that
    come before the first video one (AAC priming, an audio stream that starts earlier), and a seek to
    the audio stream's start time misses packets that lie before it. The stream's own first index entry
    (or, without an index, a time before any packet) lands on its first packet in every container tried
    (mp4, mov, 3gp, mkv, webm, avi, mpg, ts: tests/data/test_one_decode.py)."""
    entries = stream.index_entries
    seeks = [(entries[0].timestamp, stream)] if len(entries) else []
    seeks.append((-(2**62), stream))  # before any packet: demuxers clamp it to their first
    seeks.append((0, None))  # the last resort of a demuxer that refuses both (none tried does)
    error: av.FFmpegError | None = None
    for target, on in seeks:
        try:
            container.seek(target, stream=on, backward=True)
            return
        except av.FFmpegError as failed:
            error = failed
    raise DecodeError(path, f"cannot seek back to the start of the {stream.type} stream: {error}")


def _stream_start(container: av.container.InputContainer, stream: av.stream.Stream) -> Fraction:
    if stream.start_time is not None:
        return stream.start_time * stream.time_base
    if container.start_time is not None:
        return container.start_time * _CONTAINER_TIME_BASE
    return Fraction(0)


def _video_duration(
    container: av.container.InputContainer, video: av.video.stream.VideoStream, video_start: Fraction
) -> Fraction | None:
    """The stream's declared duration; else the end of its last packet minus its start.

    Containers without stream durations (Matroska/WebM) disagree on what the container duration
    counts from, so it is not used: the last packets are read instead (packet headers only, after a
    seek towards the end when the container allows, so a long file is not read through).
    """
    if video.duration:
        return video.duration * video.time_base
    end = _last_packet_end(container, video)
    return None if end is None else end - video_start


def _last_packet_end(
    container: av.container.InputContainer, video: av.video.stream.VideoStream
) -> Fraction | None:
    rate = video.average_rate or video.guessed_rate
    period = 1 / Fraction(rate) if rate else Fraction(0)
    if container.duration:
        try:
            container.seek(container.duration + (container.start_time or 0), backward=True)
        except av.FFmpegError:
            container.seek(0)
    end = None
    for packet in container.demux(video):
        if packet.pts is None:
            continue
        packet_end = packet.pts * video.time_base + (
            packet.duration * video.time_base if packet.duration else period
        )
        end = packet_end if end is None else max(end, packet_end)
    container.seek(0)
    return end
