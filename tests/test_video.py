"""Video input: the frame-sampling rule and decoding with PyAV (docs/model.md §6, "Video").

Clips are written with PyAV (``helpers.write_clip``). Every frame carries its own number as a 4x3 grid
of 16x16 black or white blocks (12 bits, one per block, aligned to the codec's macroblocks), which
survives lossy compression, so each test can tell exactly WHICH frames came back.
"""

from __future__ import annotations

import fractions
import io
import math
import os
import struct
import warnings

import av
import numpy as np
import pytest
from PIL import Image

from helpers import CLIP_HEIGHT, CLIP_WIDTH, frame_number, frame_pixels, write_clip
from minicpmv_jax import video
from minicpmv_jax.video import VideoError, VideoWarning, load_video, sample_frame_indices

W, H = CLIP_WIDTH, CLIP_HEIGHT


# --------------------------------------------------------------------------------------------------
# The rule, written from the text of docs/model.md (not from the module)


def _oracle(num_frames: int, fps: float, max_frames: int) -> list[int]:
    """docs/model.md §6: every round(avg_fps)-th frame from 0; if more than max_frames, the i-th kept is entry
    int(i*g + g/2) of that list, g = len / max_frames. A step that rounds to 0 (fps < 0.5) means every
    frame (the module's documented guard)."""
    step = round(fps) or 1
    one_per_second = [k for k in range(num_frames) if k % step == 0]
    if len(one_per_second) <= max_frames:
        return one_per_second
    g = len(one_per_second) / max_frames
    return [one_per_second[int(i * g + g / 2)] for i in range(max_frames)]


# Worked by hand from the text of docs/model.md.
HAND_CASES = [
    ((0, 30.0, 64), []),
    ((1, 30.0, 64), [0]),
    ((120, 30.0, 64), [0, 30, 60, 90]),
    ((121, 30.0, 64), [0, 30, 60, 90, 120]),
    ((120, 29.97, 64), [0, 30, 60, 90]),  # round(29.97) = 30
    ((100, 23.976, 64), [0, 24, 48, 72, 96]),
    ((10, 2.5, 64), [0, 2, 4, 6, 8]),  # Python round: ties to even, 2.5 -> 2
    ((10, 3.5, 64), [0, 4, 8]),  # 3.5 -> 4
    ((7, 0.3, 64), [0, 1, 2, 3, 4, 5, 6]),  # rounds to 0: every frame
    ((7, 0.5, 64), [0, 1, 2, 3, 4, 5, 6]),  # round(0.5) = 0 as well
    ((4, 1e9, 64), [0]),
    ((100, 1.0, 4), [12, 37, 62, 87]),  # g = 25: int(12.5), int(37.5), …
    ((65, 1.0, 64), list(range(32)) + list(range(33, 65))),  # g = 65/64: only entry 32 is dropped
    ((125, 25.0, 3), [0, 50, 100]),  # 5 one-per-second frames, g = 5/3: entries 0, 2, 4
    ((8, 1.0, 1), [4]),  # g = 8: entry int(4)
]


@pytest.mark.parametrize(("args", "expected"), HAND_CASES)
def test_sample_frame_indices_hand_worked(args, expected):
    assert sample_frame_indices(*args) == expected
    assert _oracle(*args) == expected  # the oracle agrees with the hand-worked values


TABLE = [
    (n, fps, m)
    for fps in (24.0, 25.0, 29.97, 30.0, 60.0, 30000 / 1001, 24000 / 1001, 0.25, 1.0, 1.5, 12.5)
    for n in (0, 1, 2, 23, 24, 25, 59, 60, 61, 300, 1919, 1920, 1921, 1950, 64 * 60 + 1, 3 * 3600 * 30)
    for m in (1, 2, 7, 64, 100)
]


def test_sample_frame_indices_matches_design_over_table():
    for n, fps, m in TABLE:
        got = sample_frame_indices(n, fps, m)
        assert got == _oracle(n, fps, m), (n, fps, m)
        # Properties that hold whatever the parameters.
        step = max(1, round(fps))
        assert len(got) == min(math.ceil(n / step), m), (n, fps, m)
        assert all(0 <= i < n and i % step == 0 for i in got)
        assert got == sorted(set(got))


def test_sample_frame_indices_default_max_frames_and_number_types():
    # A 10-minute 30 fps video: 600 one-per-second frames, thinned to the default 64.
    got = sample_frame_indices(600 * 30, 30.0)
    assert len(got) == 64 and got == _oracle(600 * 30, 30.0, 64)
    assert sample_frame_indices(np.int64(120), np.float32(30.0), np.int32(64)) == [0, 30, 60, 90]
    assert sample_frame_indices(120, fractions.Fraction(30000, 1001)) == [0, 30, 60, 90]
    assert all(type(i) is int for i in sample_frame_indices(np.int64(90), 30.0))
    # A header may claim any count: the answer costs O(max_frames), not O(num_frames).
    huge = sample_frame_indices(10**15, 30.0, 4)
    assert len(huge) == 4 and all(i % 30 == 0 for i in huge) and huge[-1] < 10**15


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_frames=-1, avg_fps=30.0), "num_frames"),
        (dict(num_frames=10.0, avg_fps=30.0), "num_frames"),
        (dict(num_frames=True, avg_fps=30.0), "num_frames"),
        (dict(num_frames=10, avg_fps=0.0), "avg_fps"),
        (dict(num_frames=10, avg_fps=-25.0), "avg_fps"),
        (dict(num_frames=10, avg_fps=float("nan")), "avg_fps"),
        (dict(num_frames=10, avg_fps=float("inf")), "avg_fps"),
        (dict(num_frames=10, avg_fps="30"), "avg_fps"),
        (dict(num_frames=10, avg_fps=None), "avg_fps"),
        (dict(num_frames=10, avg_fps=30.0, max_frames=0), "max_frames"),
        (dict(num_frames=10, avg_fps=30.0, max_frames=-3), "max_frames"),
        (dict(num_frames=10, avg_fps=30.0, max_frames=2.0), "max_frames"),
    ],
)
def test_sample_frame_indices_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_frame_indices(**kwargs)


# --------------------------------------------------------------------------------------------------
# Clips


def _numbers(frames: list[Image.Image]) -> list[int]:
    return [frame_number(f) for f in frames]


def _decodable_count(path) -> int:
    """How many frames PyAV itself decodes from ``path`` (independent of the module)."""
    count = 0
    try:
        with av.open(str(path)) as c:
            for packet in c.demux(video=0):
                try:
                    count += len(packet.decode())
                except av.error.FFmpegError:
                    pass
    except av.error.FFmpegError:
        pass
    return count


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return {
        "mp4_30": (write_clip(d / "a.mp4", 120, 30), 120, 30.0),  # 4 s
        "avi_25": (write_clip(d / "b.avi", 125, 25), 125, 25.0),  # 5 s
        "mkv_24": (write_clip(d / "c.mkv", 100, 24), 100, 24.0),  # no frame count in the header
        "mp4_2997": (write_clip(d / "d.mp4", 120, fractions.Fraction(30000, 1001)), 120, 30000 / 1001),
        "mp4_60": (write_clip(d / "e.mp4", 180, 60), 180, 60.0),  # 3 s
        "mp4_bframes": (write_clip(d / "f.mp4", 50, 25, options={"bf": "2"}), 50, 25.0),
        "long_1fps": (write_clip(d / "g.mp4", 70, 1), 70, 1.0),  # 70 s: more one-per-second frames than 64
        "mp4_faststart": (
            write_clip(d / "h.mp4", 100, 25, container_options={"movflags": "faststart"}), 100, 25.0),
    }


def _load_quietly(source, *args, **kwargs):
    """load_video, failing the test on any VideoWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", VideoWarning)
        return load_video(source, *args, **kwargs)


# --------------------------------------------------------------------------------------------------
# load_video: the right frames


@pytest.mark.parametrize("key", ["mp4_30", "avi_25", "mkv_24", "mp4_2997", "mp4_60", "mp4_bframes", "mp4_faststart"])
def test_load_video_returns_the_one_per_second_frames(clips, key):
    path, n, fps = clips[key]
    frames = _load_quietly(path)
    assert all(isinstance(f, Image.Image) and f.mode == "RGB" and f.size == (W, H) for f in frames)
    assert _numbers(frames) == _oracle(n, fps, 64)


def test_load_video_known_frames_by_hand(clips):
    assert _numbers(_load_quietly(clips["mp4_30"][0])) == [0, 30, 60, 90]
    assert _numbers(_load_quietly(clips["avi_25"][0])) == [0, 25, 50, 75, 100]
    assert _numbers(_load_quietly(clips["mkv_24"][0])) == [0, 24, 48, 72, 96]
    assert _numbers(_load_quietly(clips["mp4_2997"][0])) == [0, 30, 60, 90]
    assert _numbers(_load_quietly(clips["mp4_60"][0])) == [0, 60, 120]


def test_load_video_presentation_order_with_b_frames(clips):
    path, n, _ = clips["mp4_bframes"]
    with av.open(str(path)) as c:  # the clip really has reordered frames
        assert any(p.pts != p.dts for p in c.demux(video=0) if p.size)
    assert _numbers(_load_quietly(path, max_frames=n)) == [0, 25]


@pytest.mark.parametrize("max_frames", [1, 2, 3, 4, 64])
def test_load_video_thins_to_max_frames(clips, max_frames):
    path, n, fps = clips["avi_25"]
    assert _numbers(_load_quietly(path, max_frames)) == _oracle(n, fps, max_frames)


def test_load_video_long_clip_keeps_64_spread_frames(clips):
    path, n, fps = clips["long_1fps"]
    got = _numbers(_load_quietly(path))
    assert len(got) == 64 and got == _oracle(n, fps, 64)
    assert got == sorted(set(got)) and got[0] == 0 and got[-1] == 69


def test_load_video_from_file_objects_and_bytes(clips):
    path, n, fps = clips["mp4_30"]
    expected = _oracle(n, fps, 64)
    with open(path, "rb") as fp:
        fp.seek(17)
        assert _numbers(_load_quietly(fp)) == expected
        assert not fp.closed and fp.tell() == 17  # read, not closed, position restored
    data = path.read_bytes()
    buf = io.BytesIO(data)
    assert _numbers(_load_quietly(buf)) == expected
    assert _numbers(_load_quietly(data)) == expected
    assert _numbers(_load_quietly(bytearray(data), max_frames=2)) == _oracle(n, fps, 2)
    assert _numbers(_load_quietly(str(path))) == expected


def test_load_video_ignores_audio_and_trusts_the_video_track_duration(tmp_path):
    # 3 s of video, 6 s of audio: the container lasts 6 s, which must not read as a truncated video.
    path = write_clip(tmp_path / "av.mkv", 72, 24, audio_seconds=6)
    with av.open(str(path)) as c:
        assert {s.type for s in c.streams} == {"video", "audio"}
    assert _numbers(_load_quietly(path)) == [0, 24, 48]


def test_load_video_header_frame_count_that_lies(clips, tmp_path):
    """The AVI header's frame count (avih and strh) is patched; the frames that decode decide."""
    data = bytearray(clips["avi_25"][0].read_bytes())
    n, fps = clips["avi_25"][1:]
    for claim in (60, 250):  # fewer / more than the 125 frames really there
        patched = bytearray(data)
        struct.pack_into("<I", patched, patched.find(b"avih") + 8 + 16, claim)  # dwTotalFrames
        struct.pack_into("<I", patched, patched.find(b"strh") + 8 + 32, claim)  # dwLength
        path = tmp_path / f"claims{claim}.avi"
        path.write_bytes(bytes(patched))
        with av.open(str(path)) as c:
            assert c.streams.video[0].frames == claim  # PyAV reports the lie
        for max_frames in (64, 3):  # 3: the first pass's choice does not contain the right one
            if claim < n:
                got = _load_quietly(path, max_frames)
            else:
                with pytest.warns(VideoWarning, match=f"header states {claim} frames but only {n} decoded"):
                    got = load_video(path, max_frames)
            assert _numbers(got) == _oracle(n, fps, max_frames), (claim, max_frames)


def test_load_video_with_metadata_that_is_not_utf8(tmp_path):
    # PyAV's default (strict UTF-8) would fail to open this file at all.
    path = tmp_path / "latin1.mkv"
    with av.open(str(path), "w", metadata_encoding="latin-1") as out:
        out.metadata["title"] = "caf\xe9"
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i in range(25):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame_pixels(i), format="rgb24")))
        out.mux(stream.encode())
    assert _numbers(_load_quietly(path)) == [0, 10, 20]


# --------------------------------------------------------------------------------------------------
# load_video: truncated and damaged files


def test_truncated_avi_returns_decodable_frames_with_a_warning(clips, tmp_path):
    path, n, fps = clips["avi_25"]
    cut = tmp_path / "cut.avi"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 6 // 10])
    decodable = _decodable_count(cut)
    assert 0 < decodable < n
    with pytest.warns(VideoWarning, match=r"'.*cut\.avi' is truncated or damaged: its header states 125 frames"):
        frames = load_video(cut)
    assert _numbers(frames) == _oracle(decodable, fps, 64)


def test_truncated_faststart_mp4_returns_decodable_frames_with_a_warning(clips, tmp_path):
    path, n, fps = clips["mp4_faststart"]
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    decodable = _decodable_count(cut)
    assert 0 < decodable < n
    with pytest.warns(VideoWarning, match="cut.mp4"):
        frames = load_video(cut, 3)
    assert _numbers(frames) == _oracle(decodable, fps, 3)


def test_truncated_before_the_first_frame_is_an_error(clips, tmp_path):
    path = clips["mp4_faststart"][0]  # index first, then the data: cut just after the index
    data = path.read_bytes()
    cut = tmp_path / "headers_only.mp4"
    cut.write_bytes(data[: data.find(b"mdat") + 4 + 8])
    with av.open(str(cut)) as c:
        assert c.streams.video[0].frames == 100  # the header still promises every frame
    with pytest.raises(VideoError, match=r"headers_only\.mp4' has no decodable frames"):
        load_video(cut)


def test_truncated_mkv_without_frame_count_is_detected_by_duration(clips, tmp_path):
    path, n, fps = clips["mkv_24"]
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 6 // 10])
    decodable = _decodable_count(cut)
    assert 0 < decodable < n
    with pytest.warns(VideoWarning, match="duration"):
        frames = load_video(cut)
    assert _numbers(frames) == _oracle(decodable, fps, 64)


def test_truncated_mp4_with_index_at_the_end_is_an_error(clips, tmp_path):
    path = clips["mp4_30"][0]  # the muxer writes the moov index after the data: cut, nothing is playable
    cut = tmp_path / "cut_moov.mp4"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(VideoError, match=r"cut_moov\.mp4.*corrupt or truncated"):
        load_video(cut)


@pytest.mark.parametrize("seed", range(6))
def test_damaged_middle_never_escapes_as_a_pyav_error(clips, tmp_path, seed):
    path = clips["avi_25"][0]
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    start = int(rng.integers(len(data) // 4, len(data) * 3 // 4))
    data[start:start + 600] = rng.bytes(600)
    bad = tmp_path / f"bad{seed}.avi"
    bad.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VideoWarning)
        try:
            frames = load_video(bad)
        except VideoError as err:
            assert "bad" in str(err)
        else:
            assert frames and all(f.mode == "RGB" for f in frames)


# --------------------------------------------------------------------------------------------------
# load_video: not a (usable) video


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(VideoError, match=r"'.*nope\.mp4' does not exist"):
        load_video(tmp_path / "nope.mp4")
    with pytest.raises(VideoError, match="is a directory"):
        load_video(tmp_path)


def test_random_bytes(tmp_path):
    noise = np.random.default_rng(0).bytes(8000)
    path = tmp_path / "noise.mp4"
    path.write_bytes(noise)
    with pytest.raises(VideoError, match=r"noise\.mp4"):
        load_video(path)
    with pytest.raises(VideoError, match="<8000 bytes>"):
        load_video(noise)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(VideoError, match=r"empty\.mp4.*empty"):
        load_video(path)
    with pytest.raises(VideoError):
        load_video(b"")


def test_text_file_is_not_a_video(tmp_path):
    # FFmpeg on its own opens a .txt file as a video of rendered text (its "tty" demuxer).
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not a video\n" * 40)
    with pytest.raises(VideoError, match=r"notes\.txt.*not a video"):
        load_video(path)
    with open(path, "rb") as fp:  # PyAV passes the file object's name on to FFmpeg's probe
        with pytest.raises(VideoError, match=r"notes\.txt"):
            load_video(fp)


def test_still_image_is_not_a_video(tmp_path):
    path = tmp_path / "still.png"
    Image.fromarray(frame_pixels(5)).save(path)
    with pytest.raises(VideoError, match=r"still\.png"):
        load_video(path)


def test_audio_only_files(tmp_path):
    wav = tmp_path / "tone.wav"
    with av.open(str(wav), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    with pytest.raises(VideoError, match=r"tone\.wav.*not a video"):
        load_video(wav)

    m4a = tmp_path / "tone.m4a"  # a container that can hold video, holding only audio
    try:
        with av.open(str(m4a), "w", format="mp4") as out:
            stream = out.add_stream("aac", rate=44100, layout="mono")
            for k in range(20):
                frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                frame.sample_rate, frame.pts = 44100, k * 1024
                out.mux(stream.encode(frame))
            out.mux(stream.encode())
    except (av.error.FFmpegError, ValueError) as err:  # pragma: no cover - depends on the FFmpeg build
        pytest.skip(f"this FFmpeg build cannot write AAC in MP4: {err}")
    with pytest.raises(VideoError, match=r"tone\.m4a' has no video stream \(stream types: audio\)"):
        load_video(m4a)


def test_frames_larger_than_max_pixels_are_refused(clips):
    path = clips["mp4_30"][0]
    with pytest.raises(VideoError, match=rf"a\.mp4.*64x48 = 3072 pixels.*max_pixels={W * H - 1}"):
        load_video(path, max_pixels=W * H - 1)
    assert len(_load_quietly(path, max_pixels=W * H)) == 4
    assert len(_load_quietly(path, max_pixels=None)) == 4


@pytest.mark.parametrize("max_frames", [0, -1, 2.5, True, None])
def test_bad_max_frames(clips, max_frames):
    with pytest.raises(ValueError, match="max_frames"):
        load_video(clips["mp4_30"][0], max_frames)


@pytest.mark.parametrize("max_pixels", [0, -5, 1.5])
def test_bad_max_pixels(clips, max_pixels):
    with pytest.raises(ValueError, match="max_pixels"):
        load_video(clips["mp4_30"][0], max_pixels=max_pixels)


def test_bad_source_types(clips, tmp_path):
    with pytest.raises(TypeError):
        load_video(12345)
    with open(clips["mp4_30"][0], encoding="latin-1") as text_fp:
        with pytest.raises(TypeError, match="binary mode"):
            load_video(text_fp)

    class Unseekable(io.RawIOBase):
        def readable(self):
            return True

        def seekable(self):
            return False

        def readinto(self, b):
            return 0

    with pytest.raises(VideoError, match="not seekable"):
        load_video(Unseekable())


def test_errors_are_value_errors_and_public_api():
    assert issubclass(VideoError, ValueError)
    assert issubclass(VideoWarning, UserWarning)
    for name in video.__all__:
        assert hasattr(video, name), name
    assert {"load_video", "sample_frame_indices", "VideoError"} <= set(video.__all__)


def test_permission_denied(tmp_path):
    path = tmp_path / "locked.mp4"
    path.write_bytes(b"\x00" * 100)
    os.chmod(path, 0)
    try:
        if os.access(path, os.R_OK):  # running as root: permissions are not enforced
            pytest.skip("running with permissions that ignore file modes")
        with pytest.raises(VideoError, match=r"locked\.mp4"):
            load_video(path)
    finally:
        os.chmod(path, 0o600)
