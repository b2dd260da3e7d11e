"""Video input (docs/model.md §6, "Video"): which frames to take, and decoding them with PyAV.

The model sees a video as a sequence of frames, each an ordinary image (one user message, frames in
order, before the question). Two steps::

    sample_frame_indices   (frame count, average fps, max_frames) -> indices, the model card's rule
    load_video             path / file object / bytes -> those frames as RGB PIL images

Frame numbers are positions in the decoded stream (presentation order, 0-based), as in the reference's
``decord.VideoReader``. Container metadata is only a hint: the frame count in the header may be missing,
wrong, or describe more frames than a truncated file still holds, so :func:`load_video` always verifies
it against the frames it actually decodes and re-samples from the true count when they differ. It never
holds more than the selected frames in memory.

Rotation metadata (phone videos) is not applied, as in the reference; frames come out as stored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import numbers
import os
import re
import warnings
from collections.abc import Iterator
from typing import BinaryIO, Union

import av
from PIL import Image

from minicpmv_jax.errors import ArgumentError

__all__ = [
    "VideoError",
    "VideoWarning",
    "VideoSource",
    "DEFAULT_MAX_FRAME_PIXELS",
    "VIDEO_FORMATS",
    "VIDEO_OPTIONS",
    "sample_frame_indices",
    "load_video",
]

#: The model card's processor settings for a video's frames (docs/model.md §6): frames are plain images,
#: without image ids, each cut into at most 2 slices. ``chat --video`` and the server's ``video_url`` use them.
VIDEO_OPTIONS = {"use_image_id": False, "max_slice_nums": 2}

# The largest picture any level of H.264, HEVC or AV1 allows (35 651 584 luma samples = 8192x4352).
# With max_frames=64 the returned RGB frames then take at most 64 x 3 x 35.7 MB = 6.8 GB; pass a
# smaller max_pixels where that is too much.
DEFAULT_MAX_FRAME_PIXELS = 35_651_584

# FFmpeg demuxers we accept, by short name (FFmpeg's "format_whitelist": a demuxer is allowed if any
# of its comma-separated names is listed, so "mov" admits "mov,mp4,m4a,3gp,3g2,mj2"). An allow-list,
# because FFmpeg can otherwise "play" almost anything: a .txt file opens as a video of rendered text
# (the "tty" demuxer), still images open as one-frame videos, and playlist or session formats (hls,
# concat, sdp, …) open further files or network connections named inside the input.
VIDEO_FORMATS = (
    "mov",  # .mp4 .mov .m4v .3gp
    "matroska",  # .mkv .webm
    "avi",
    "flv",
    "asf",  # .wmv
    "mpeg",  # MPEG program stream: .mpg .vob
    "mpegts",  # .ts .m2ts .mts
    "mpegvideo",  # raw MPEG-1/2 video
    "ogg",  # .ogv
    "mxf",
    "nut",
    "rm",
    "dv",
    "gif",
    "apng",
    "ivf",  # VP8/VP9/AV1 in IVF
    "obu",  # raw AV1
    "h264",  # raw Annex B streams
    "hevc",
    "vvc",
    "m4v",  # raw MPEG-4 part 2
    "mjpeg",
    "yuv4mpegpipe",  # .y4m
)

VideoSource = Union[str, os.PathLike, BinaryIO, bytes, bytearray, memoryview]

_DURATION_TAG = re.compile(r"^(\d+):(\d{1,2}):(\d{1,2}(?:\.\d+)?)$")


class VideoError(ValueError):
    """An input that is not a usable video: missing, unreadable, corrupt, without decodable video frames."""


class VideoWarning(UserWarning):
    """A video that could be used only in part (e.g. truncated): the frames returned come from what decoded."""


# --------------------------------------------------------------------------------------------------
# Which frames (pure)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentError("{} must be an int, got {kind} {value!r}", name, kind=type(value).__name__, value=value)
    if value < minimum:
        raise ArgumentError("{} must be at least {minimum}, got {value}", name, minimum=minimum, value=value)
    return int(value)


def sample_frame_indices(num_frames: int, avg_fps: float, max_frames: int = 64) -> list[int]:
    """The frames the model card's video example takes (docs/model.md §6): one per second, at most ``max_frames``.

    Every ``round(avg_fps)``-th frame starting at frame 0 (Python ``round``, ties to even: 29.97 → 30,
    23.976 → 24, 2.5 → 2); if that is more than ``max_frames`` frames, ``max_frames`` of them spread
    evenly: with ``g = len / max_frames`` the i-th kept one is entry ``int(i·g + g/2)`` of that list.

    A rate below 0.5 fps would round to a step of 0; such frames are already more than a second apart,
    so the step is 1 (every frame), which keeps the "one frame per second at most" intent.

    Args:
      num_frames: frames in the video (0 gives ``[]``).
      avg_fps: its average frame rate; must be finite and positive (a rate that is unknown must be
        found out, not guessed here).
      max_frames: the most frames to return, at least 1.

    Returns:
      Increasing frame indices, each in ``range(num_frames)``.

    Raises:
      ValueError: an argument of the wrong type or out of range.
    """
    num_frames = _check_int("num_frames", num_frames, 0)
    max_frames = _check_int("max_frames", max_frames, 1)
    if isinstance(avg_fps, bool) or not isinstance(avg_fps, numbers.Real):
        raise ValueError(f"avg_fps must be a real number, got {type(avg_fps).__name__} {avg_fps!r}")
    fps = float(avg_fps)
    if not math.isfinite(fps) or fps <= 0.0:
        raise ValueError(f"avg_fps must be finite and positive, got {avg_fps!r}")
    step = max(1, round(fps))
    one_per_second = range(0, num_frames, step)  # a range: a header claiming 10**12 frames costs nothing
    if len(one_per_second) <= max_frames:
        return list(one_per_second)
    gap = len(one_per_second) / max_frames
    return [one_per_second[int(i * gap + gap / 2)] for i in range(max_frames)]


# --------------------------------------------------------------------------------------------------
# Opening


def _describe(obj: object) -> str:
    """How a video source is named in messages."""
    if isinstance(obj, (str, os.PathLike)):
        return repr(os.fspath(obj))
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return f"<{len(obj)} bytes>"
    name = getattr(obj, "name", None)
    if isinstance(name, (str, bytes)) and name:
        return repr(name)
    return f"<{type(obj).__name__} object>"


@contextlib.contextmanager
def _binary_file(source: VideoSource, name: str) -> Iterator[BinaryIO]:
    """The source as a readable, seekable binary file object; a path is opened (and closed) here.

    Paths are opened by Python, not by FFmpeg, so no part of a name is ever read as an FFmpeg protocol
    ("pipe:", "http:", "concat:", …) and names that are not valid UTF-8 work.
    """
    if isinstance(source, (str, os.PathLike)):
        try:
            fp = open(os.path.expanduser(source), "rb")
        except FileNotFoundError as err:
            raise VideoError(f"video file {name} does not exist") from err
        except IsADirectoryError as err:
            raise VideoError(f"video path {name} is a directory, not a file") from err
        except OSError as err:
            raise VideoError(f"cannot open video file {name}: {err.strerror or err}") from err
        with fp:
            try:
                empty = os.fstat(fp.fileno()).st_size == 0
            except (OSError, ValueError):
                empty = False
            if empty:
                raise VideoError(f"video file {name} is empty (0 bytes)")
            yield fp
        return
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield io.BytesIO(bytes(source))
        return
    if isinstance(source, io.TextIOBase):
        raise TypeError(f"video file object {name} is open in text mode; open it in binary mode ('rb')")
    if not (callable(getattr(source, "read", None)) and callable(getattr(source, "seek", None))):
        raise TypeError(f"video must be a path, a binary file object or bytes, got {type(source).__name__}")
    seekable = getattr(source, "seekable", None)
    if callable(seekable) and not seekable():
        raise VideoError(f"video file object {name} is not seekable; write it to a file or a BytesIO first")
    position = source.tell() if callable(getattr(source, "tell", None)) else None
    try:
        yield source
    finally:
        if position is not None:
            with contextlib.suppress(OSError, ValueError):
                source.seek(position)


@contextlib.contextmanager
def _open_container(fp: BinaryIO, name: str) -> Iterator[av.container.InputContainer]:
    """Opens the whole of ``fp`` (from offset 0) with PyAV, mapping every failure to a VideoError."""
    fp.seek(0)
    try:
        container = av.open(
            fp,
            mode="r",
            container_options={"format_whitelist": ",".join(VIDEO_FORMATS)},
            # PyAV decodes metadata strictly as UTF-8 by default: one Latin-1 title would make the
            # whole file fail to open with a UnicodeDecodeError.
            metadata_errors="replace",
        )
    except av.error.ArgumentError as err:
        # FFmpeg answers EINVAL when the probed format is not on the whitelist (e.g. a text file, a WAV).
        raise VideoError(
            f"{name} is not a video in an accepted container format (mp4/mov, mkv/webm, avi, …; the FFmpeg "
            "demuxers in minicpmv_jax.video.VIDEO_FORMATS)"
        ) from err
    except (av.error.InvalidDataError, av.error.EOFError) as err:
        raise VideoError(
            f"{name} is not a video file FFmpeg can read (unknown format, or corrupt or truncated)"
        ) from err
    except av.error.FFmpegError as err:
        raise VideoError(f"cannot open video {name}: {type(err).__name__}: {err.strerror or err}") from err
    with container:
        yield container


def _video_stream(container: av.container.InputContainer, name: str) -> av.video.stream.VideoStream:
    """The first video stream that is a moving picture (cover art, "attached pictures", is skipped)."""
    attached = av.stream.Disposition.attached_pic
    for stream in container.streams.video:
        if not stream.disposition & attached:
            return stream
    kinds = sorted({s.type for s in container.streams}) or ["none"]
    raise VideoError(f"{name} has no video stream (stream types: {', '.join(kinds)})")


def _check_pixels(width: int, height: int, what: str, name: str, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise VideoError(
            f"video {name}: {what} is {width}x{height} = {width * height} pixels per frame, more than "
            f"max_pixels={max_pixels}; refusing it (pass a larger max_pixels to accept it)"
        )


# --------------------------------------------------------------------------------------------------
# Metadata


def _positive(value: object) -> float | None:
    """``value`` as a finite positive float, else None (PyAV gives None or 0 for unknown rates)."""
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    return result if math.isfinite(result) and result > 0.0 else None


def _declared_duration(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> float | None:
    """The video stream's duration in seconds from the header, if the file states it."""
    if stream.duration and stream.time_base:
        return _positive(stream.duration * stream.time_base)
    tag = _DURATION_TAG.match(str(stream.metadata.get("DURATION", "")).strip())  # Matroska per-track tag
    if tag:
        hours, minutes, seconds = tag.groups()
        return _positive(int(hours) * 3600 + int(minutes) * 60 + float(seconds))
    if container.duration and len(container.streams) == 1:  # with other streams it may be theirs
        return _positive(container.duration / av.time_base)
    return None


def _demux_count(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> tuple[int, float | None]:
    """Counts the stream's packets without decoding; returns (count, seconds spanned by their timestamps)."""
    count, first, end = 0, None, None
    try:
        for packet in container.demux(stream):
            if not packet.size:
                continue
            count += 1
            if packet.pts is not None:
                stop = packet.pts + (packet.duration or 0)
                first = packet.pts if first is None else min(first, packet.pts)
                end = stop if end is None else max(end, stop)
    except av.error.FFmpegError:
        pass  # a damaged tail: the decoding pass reports it
    span = None
    if first is not None and end is not None and stream.time_base:
        span = _positive((end - first) * stream.time_base)
    return count, span


# --------------------------------------------------------------------------------------------------
# Decoding


@dataclasses.dataclass
class _Decoded:
    """What one decoding pass saw: the kept frames by index, how many frames decoded, the first error."""

    frames: dict[int, Image.Image] = dataclasses.field(default_factory=dict)
    count: int = 0
    error: str | None = None


def _decode(
    fp: BinaryIO, name: str, wanted: set[int], max_pixels: int | None, stop_after: int | None = None
) -> _Decoded:
    """Decodes the video stream in order, keeping (as RGB PIL images) only the frames in ``wanted``.

    A packet that fails to decode is skipped (and remembered); an error while reading the file ends
    the pass (truncated or damaged file). With ``stop_after``, stops once that many frames decoded.
    """
    result = _Decoded()
    with _open_container(fp, name) as container:
        stream = _video_stream(container, name)
        stream.codec_context.thread_type = "AUTO"
        packets = container.demux(stream)
        while stop_after is None or result.count < stop_after:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError as err:
                result.error = f"reading stopped after frame {result.count}: {err.strerror or err}"
                break
            try:
                frames = packet.decode()
            except av.error.FFmpegError as err:
                if result.error is None:
                    result.error = f"a packet after frame {result.count} failed to decode: {err.strerror or err}"
                continue
            for frame in frames:
                index = result.count
                _check_pixels(frame.width, frame.height, f"frame {index}", name, max_pixels)
                if index in wanted:
                    try:
                        result.frames[index] = frame.to_image()
                    except (av.error.FFmpegError, ValueError) as err:
                        raise VideoError(
                            f"video {name}: cannot convert frame {index} ({frame.format.name}) to RGB: {err}"
                        ) from err
                result.count += 1
                if stop_after is not None and result.count >= stop_after:
                    break
    return result


def load_video(
    source: VideoSource, max_frames: int = 64, *, max_pixels: int | None = DEFAULT_MAX_FRAME_PIXELS
) -> list[Image.Image]:
    """Decodes a video and returns the frames the model card's rule picks (:func:`sample_frame_indices`).

    The frame count and average frame rate come from the file and are checked: the rate is the stream's
    average rate, else FFmpeg's guessed rate, else frames per second of timestamps; the count is the
    header's, else the number of packets, and in every case the number of frames that actually decode.
    If that differs from the count first assumed, the frames are chosen again from the true count (a
    second decoding pass). Only the chosen frames are kept in memory.

    Args:
      source: a path (``str`` / ``os.PathLike``), a seekable binary file object holding the whole video
        from offset 0 (read, not closed; its position is restored), or the encoded video as bytes.
      max_frames: the most frames to return (≥ 1).
      max_pixels: refuse videos whose frames have more pixels than this (checked against the stream
        header before decoding, and against every decoded frame); None disables the check.

    Returns:
      The chosen frames, in order, as RGB PIL images.

    Warns:
      VideoWarning: the video decoded only in part — fewer frames than its header states (truncated or
        damaged file), or a read/decode error on the way. The frames returned are chosen from the
        frames that did decode.

    Raises:
      VideoError: the file is missing, not a video in a supported container, corrupt, has no video
        stream or no decodable frame, has an unknown frame rate, or has frames larger than
        ``max_pixels``; the message names the source.
      ValueError: ``max_frames`` or ``max_pixels`` is out of range.
      TypeError: ``source`` is of none of the accepted types.
    """
    max_frames = _check_int("max_frames", max_frames, 1)
    if max_pixels is not None:
        max_pixels = _check_int("max_pixels", max_pixels, 1)
    name = _describe(source)
    with _binary_file(source, name) as fp:
        with _open_container(fp, name) as container:
            stream = _video_stream(container, name)
            _check_pixels(stream.codec_context.width, stream.codec_context.height, "the stream", name, max_pixels)
            declared = stream.frames if stream.frames and stream.frames > 0 else None
            fps = _positive(stream.average_rate) or _positive(stream.guessed_rate)
            duration = _declared_duration(container, stream)
        estimate = declared
        if declared is None or fps is None:
            with _open_container(fp, name) as container:
                count, span = _demux_count(container, _video_stream(container, name))
            estimate = estimate or count
            if fps is None:
                seconds = span or duration
                fps = estimate / seconds if estimate and seconds else None

        def choose(num_frames: int) -> list[int]:
            if num_frames <= 1:
                return list(range(num_frames))
            if fps is None:
                raise VideoError(f"video {name}: cannot determine its frame rate (no rate, duration or timestamps)")
            return sample_frame_indices(num_frames, fps, max_frames)

        indices = choose(estimate)
        decoded = _decode(fp, name, set(indices), max_pixels)
        if decoded.count == 0:
            why = f": {decoded.error}" if decoded.error else ""
            raise VideoError(f"video {name} has no decodable frames (corrupt or truncated?){why}")
        if decoded.count != estimate:
            indices = choose(decoded.count)
            if not set(indices) <= decoded.frames.keys():
                decoded.frames.clear()  # free the first pass's frames before the second
                again = _decode(fp, name, set(indices), max_pixels, stop_after=indices[-1] + 1)
                if not set(indices) <= again.frames.keys():
                    raise VideoError(f"video {name} decoded differently on a second pass; cannot pick its frames")
                decoded.frames = again.frames

    _warn_if_partial(name, decoded, declared, duration, fps)
    return [decoded.frames[i] for i in indices]


def _warn_if_partial(
    name: str, decoded: _Decoded, declared: int | None, duration: float | None, fps: float | None
) -> None:
    """Warns when fewer frames decoded than the file states, or when decoding met an error."""
    problems = []
    if declared is not None and decoded.count < declared:
        problems.append(f"its header states {declared} frames but only {decoded.count} decoded")
    elif declared is None and duration and fps:
        expected = duration * fps
        if decoded.count < expected - max(2.0, 0.02 * expected):
            problems.append(
                f"it states a duration of {duration:.3f} s (about {expected:.0f} frames at "
                f"{fps:.6g} fps) but only {decoded.count} frames decoded"
            )
    if decoded.error:
        problems.append(decoded.error)
    if problems:
        warnings.warn(
            f"video {name} is truncated or damaged: {'; '.join(problems)}. "
            f"Using frames chosen from the {decoded.count} frames that decoded.",
            VideoWarning,
            stacklevel=3,
        )

