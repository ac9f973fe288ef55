"""Decoding the few video frames a clip contributes (SPEC §1), without decoding the whole stream.

Frame rule: for each target time `t` (seconds from the video stream's first presentation time) the
frame taken is the first one whose presentation time is at or after `t`. If the stream ends before
`t`, its last frame is taken while it is still on screen at `t` (`time + frame period >= t`);
otherwise the stream is truncated. Timestamps are compared exactly (`Fraction`s of the stream time
base), so variable frame rate and a non-zero `start_time` need no special case, and the actual time of
every chosen frame is returned.

Orientation: a display matrix (phones write one, e.g. a rotation of -90 degrees for a portrait video
stored landscape) is applied to every frame as ffmpeg's autorotate does (quarter turns and mirrors), so
frames are returned upright; `SampledFrames` says what was applied.

Seeking: the stream's keyframe index (mp4, mkv, avi, ... carry one) tells whether a keyframe lies
between the frames already decoded and the next target; only then does the reader seek, so it never
decodes much more than a forward pass and skips whole groups of pictures in long clips. A seek that
lands after its target (an index of decode rather than presentation times) is caught and answered by
decoding from the start. Streams without an index are decoded forward.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.container
import numpy as np
from av.sidedata.sidedata import Type
from PIL import Image

from avsync.data.errors import DecodeError
from avsync.data.images import shrink


@dataclass
class SampledFrames:
    """`images[i]`: RGB `uint8` `(H, W, 3)` for `targets[i]`, upright; `times[i]`: its presentation time
    (s). `rotation`: the display matrix's rotation that was applied, in degrees counterclockwise as
    ffprobe and PyAV report it (-90: turned a quarter clockwise); `mirrored`: it also mirrored them."""

    images: list[np.ndarray]
    times: list[float]
    rotation: int = 0
    mirrored: bool = False

    def upright(self, width: int, height: int) -> tuple[int, int]:
        """`(width, height)` of a source frame as shown: swapped by a quarter turn."""
        return (height, width) if self.rotation % 180 else (width, height)


@dataclass(frozen=True)
class Orientation:
    """What a frame's display matrix asks for: `steps` (PIL transposes, in order) and how ffprobe
    describes it (`rotation`, degrees counterclockwise, and whether it mirrors)."""

    steps: tuple[Image.Transpose, ...] = ()
    rotation: int = 0
    mirrored: bool = False


def orientation(frame: av.VideoFrame, path: str | Path) -> Orientation:
    """The transform that shows `frame` upright, chosen as ffmpeg's autorotate chooses it (fftools:
    quarter turns with the matrix's mirror folded in, `transpose` / `hflip` / `vflip`); a rotation by
    another angle is refused (`DecodeError`) rather than stored sideways."""
    data = frame.side_data.get(Type.DISPLAYMATRIX)
    if data is None:
        return Orientation()
    m = np.frombuffer(bytes(data), dtype=np.int32)  # 3x3 row-major, a b u / c d v / x y w; 16.16 fixed
    a, b, c, d = (float(v) / 65536 for v in (m[0], m[1], m[3], m[4]))
    scale_x, scale_y = math.hypot(a, c), math.hypot(b, d)
    if scale_x == 0 or scale_y == 0:
        return Orientation()  # a degenerate matrix: ffmpeg ignores it too
    rotation = -math.degrees(math.atan2(b / scale_y, a / scale_x))  # av_display_rotation_get
    clockwise = -round(rotation) % 360
    mirrored = a * d - b * c < 0
    transpose = Image.Transpose
    if clockwise == 90:
        steps = (transpose.TRANSPOSE,) if m[3] > 0 else (transpose.ROTATE_270,)
    elif clockwise == 180:
        steps = ((transpose.FLIP_LEFT_RIGHT,) if m[0] < 0 else ()) + (
            (transpose.FLIP_TOP_BOTTOM,) if m[4] < 0 else ()
        )
    elif clockwise == 270:
        steps = (transpose.TRANSVERSE,) if m[3] < 0 else (transpose.ROTATE_90,)
    elif clockwise == 0:
        steps = (transpose.FLIP_TOP_BOTTOM,) if m[4] < 0 else ()
    else:
        raise DecodeError(
            path, f"the display matrix rotates the video by {round(rotation)} degrees, not a quarter turn"
        )
    return Orientation(steps, {0: 0, 90: -90, 180: 180, 270: 90}[clockwise], mirrored)


def sample_frames(
    container: av.container.InputContainer,
    path: str | Path,
    targets: Sequence[Fraction],
    video_start: Fraction,
    short_side: int | None = None,
) -> SampledFrames:
    """Decode the frames at `targets` (ascending, seconds from `video_start`) as RGB arrays.

    `short_side` shrinks each frame as soon as it is converted (see `images.shrink`), so at most one
    full-size RGB frame exists at a time.
    """
    if list(targets) != sorted(targets):
        raise ValueError("targets must be ascending")
    reader = _FrameReader(container, path, video_start)
    images, times = [], []
    upright = None
    try:
        for target in targets:
            frame, time = reader.frame_at(target)
            if upright is None:
                # Once, from the first frame: the matrix is the stream's, and reading a frame's side data
                # ties the frame into a reference cycle that only the garbage collector frees (measured:
                # reading it from each of a 4K clip's 16 frames raised prepare's peak by 160 MiB).
                upright = orientation(frame, path)
            images.append(_to_rgb(frame, short_side, path, upright))
            times.append(float(time))
    finally:
        # The decoding generator refers back to its reader: close it now, so no cycle keeps a codec
        # context alive as garbage that a forked worker might collect (and crash on) later.
        reader.frames.close()
    upright = upright or Orientation()
    return SampledFrames(images=images, times=times, rotation=upright.rotation, mirrored=upright.mirrored)


class _FrameReader:
    """Walks one video stream forward, seeking ahead when the keyframe index says it pays."""

    def __init__(
        self, container: av.container.InputContainer, path: str | Path, video_start: Fraction
    ) -> None:
        self.container, self.path, self.video_start = container, path, video_start
        self.stream = container.streams.video[0]
        self.time_base: Fraction = self.stream.time_base
        self.keyframes = sorted(
            entry.timestamp * self.time_base - video_start
            for entry in self.stream.index_entries
            if entry.is_keyframe
        )
        self.frames = self._decode()
        self.current: tuple[av.VideoFrame, Fraction] | None = None  # last decoded frame and its time
        self.pending: tuple[av.VideoFrame, Fraction] | None = None  # decoded after a seek, not consumed

    def frame_at(self, target: Fraction) -> tuple[av.VideoFrame, Fraction]:
        if self._keyframe_ahead(target):
            self._seek(target)
        while self.current is None or self.current[1] < target:
            following = self._next()
            if following is None:
                break
            self.current = following
        if self.current is not None and (self.current[1] >= target or self._on_screen_at(target)):
            return self.current
        shown = "it has no frames" if self.current is None else f"its last at {float(self.current[1]):.3f} s"
        raise DecodeError(
            self.path, f"truncated or corrupt video stream: needed a frame at {float(target):.3f} s, {shown}"
        )

    def _keyframe_ahead(self, target: Fraction) -> bool:
        position = self.current[1] if self.current is not None else Fraction(0)
        if target <= position:
            return False
        index = bisect.bisect_right(self.keyframes, target) - 1
        return index >= 0 and self.keyframes[index] > position

    def _seek(self, target: Fraction) -> None:
        """Land on a keyframe at or before `target`. A demuxer that lands after it (its index then
        disagrees with presentation times) is answered by decoding from the stream's start."""
        self._seek_to(target)
        if self.pending is not None and self.pending[1] > target:
            self._seek_to(Fraction(0))

    def _seek_to(self, seconds: Fraction) -> None:
        try:
            ticks = int((seconds + self.video_start) / self.time_base)
            self.container.seek(ticks, stream=self.stream, backward=True, any_frame=False)
        except av.FFmpegError as error:
            reason = f"cannot seek in the video stream: {error.strerror or error}"
            raise DecodeError(self.path, reason) from error
        self.frames = self._decode()
        self.current = self.pending = None
        self.pending = self._next()

    def _next(self) -> tuple[av.VideoFrame, Fraction] | None:
        if self.pending is not None:
            following, self.pending = self.pending, None
            return following
        frame = next(self.frames, None)
        if frame is None:
            return None
        if frame.pts is None:
            raise DecodeError(self.path, "video frames carry no presentation timestamps")
        return frame, frame.pts * self.time_base - self.video_start

    def _decode(self) -> Iterator[av.VideoFrame]:
        try:
            yield from self.container.decode(self.stream)
        except av.FFmpegError as error:
            raise DecodeError(
                self.path, f"truncated or corrupt video stream: {error.strerror or error}"
            ) from error

    def _on_screen_at(self, target: Fraction) -> bool:
        """Whether the stream's last frame is still displayed at `target` (it lasts one frame period)."""
        frame, time = self.current
        if frame.duration:
            period = frame.duration * self.time_base
        else:
            rate = self.stream.average_rate or self.stream.guessed_rate
            period = 1 / Fraction(rate) if rate else Fraction(0)
        return time + period >= target


def _to_rgb(
    frame: av.VideoFrame, short_side: int | None, path: str | Path, upright: Orientation = Orientation()
) -> np.ndarray:
    try:
        image = frame.to_image()  # RGB, converted with the frame's own colorspace
    except (av.FFmpegError, ValueError) as error:
        raise DecodeError(path, f"cannot convert a video frame to RGB: {error}") from error
    image = shrink(image, short_side)  # the short side is the same either way up
    for step in upright.steps:  # exact pixel moves, after the resize: fewer pixels to move
        image = image.transpose(step)
    return np.asarray(image)
