"""Reading raw media: PyAV for video containers (flv, avi, mp4) and their audio, soundfile for WAV.

Everything that can go wrong with one file raises a :class:`MediaError` whose ``status`` names the kind of
failure (it becomes the index's status column) and whose message says what to do; the prep records it and
moves on to the next clip.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import av
import numpy as np
import soundfile as sf
import torch
from PIL import Image

LFS_PREFIX = b"version https://git-lfs"

av.logging.set_level(av.logging.PANIC)  # a broken file is reported by us, once, not by FFmpeg on stderr


class MediaError(Exception):
    status = "unreadable"


class MissingFile(MediaError):
    status = "missing"


class LfsPointer(MediaError):
    status = "lfs_pointer"


class EmptyFile(MediaError):
    status = "empty_file"


class Unreadable(MediaError):
    status = "unreadable"


class Truncated(MediaError):
    status = "truncated"


class NoAudio(MediaError):
    status = "no_audio"


class NoVideo(MediaError):
    status = "no_video"


class EmptyAudio(MediaError):
    status = "empty_audio"


class AudioTooShort(MediaError):
    status = "audio_too_short"


def check_file(path: Path) -> Path:
    """Fail early, with the right reason, on a missing file, an empty file or a git-LFS pointer."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"{path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise EmptyFile(f"{path} is 0 bytes")
    if size < 1024:
        with open(path, "rb") as f:
            head = f.read(len(LFS_PREFIX))
        if head == LFS_PREFIX:
            raise LfsPointer(f"{path} is a git-LFS pointer, not media: run `git lfs pull` in the dataset's clone")
    return path


def second_centres(duration: float) -> list[float]:
    """1-fps frame times: the centre of each second (k + 0.5 while inside the clip; a clip under 0.5 s: its middle)."""
    if not duration or duration <= 0:
        return []
    times = [k + 0.5 for k in range(int(math.ceil(duration))) if k + 0.5 < duration]
    return times or [duration / 2]


def resized(width: int, height: int, short_side: Optional[int]) -> tuple[int, int]:
    """(width, height) with the short side brought down to ``short_side`` (never up; None or 0: unchanged)."""
    short = min(width, height)
    if not short_side or short <= short_side:
        return width, height
    scale = short_side / short
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_frame(image: np.ndarray | Image.Image, quality: int) -> bytes:
    """uint8 [H, W, 3] (or [H, W], grayscale) -> JPEG bytes (Pillow, libjpeg-turbo)."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class Decoded:
    """What one pass over a container gave: 1-fps frames (uint8 [H, W, 3]), mono audio, the video's duration."""

    frames: list[np.ndarray] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    next_frames: list[np.ndarray] = field(default_factory=list)  # the frame after each one (``with_next``)
    audio: Optional[np.ndarray] = None
    sample_rate: Optional[int] = None
    duration: float = 0.0
    fps: Optional[float] = None


def _declared_duration(container, stream) -> Optional[float]:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _probe_duration(path: Path, video: bool) -> Optional[float]:
    """Duration from packet timestamps, for containers whose header does not say (a demux pass, no decoding)."""
    with av.open(str(path)) as container:
        streams = container.streams.video if video else container.streams.audio
        if not streams:
            return None
        stream, end = streams[0], None
        for packet in container.demux(stream):
            if packet.pts is None or packet.time_base is None:
                continue
            t = float((packet.pts + (packet.duration or 0)) * packet.time_base)
            end = t if end is None else max(end, t)
        return end


def frame_step(fps: Optional[float]) -> int:
    """The released extraction scripts' second, in frames: every int(fps)-th decoded frame is kept (OpenCV's
    CAP_PROP_FPS, the stream's average rate, truncated; at least 1)."""
    return max(1, int(fps or 1))


def downmix_channels(channels: np.ndarray, downmix: str) -> np.ndarray:
    """float [C, N] -> mono [N]: ``mean`` (librosa's mono=True) or ``first`` (channel 0, as torchaudio's kaldi
    fbank reads a stereo waveform). (``pyav`` is FFmpeg's own mono mix, done while resampling.)"""
    if downmix == "first":
        return np.ascontiguousarray(channels[0])
    if downmix in ("mean", "pyav"):
        return channels.mean(axis=0)
    raise ValueError(f"downmix must be pyav, mean or first, got {downmix!r}")


def decode_container(
    path: Path,
    *,
    video: bool = True,
    audio_rate: Optional[int] = None,
    short_side: Optional[int] = 256,
    min_coverage: float = 0.9,
    with_next: bool = False,
    frame_times: str = "centre",
    downmix: str = "pyav",
) -> Decoded:
    """One demux pass over a container: 1-fps frames (resized) and/or the audio resampled to mono ``audio_rate``
    Hz (``audio_rate`` None: no audio wanted). ``with_next`` also keeps the video frame that follows each kept one
    (for TSN-style RGB differences; the last frame is its own successor).

    ``frame_times``: ``centre`` keeps the frame on screen at each of :func:`second_centres`; ``second_start`` keeps
    every :func:`frame_step`-th decoded frame from the first (the released extraction: the first frame of each
    second). ``downmix``: ``pyav`` resamples straight to FFmpeg's mono layout (each of two channels x 0.707);
    ``mean`` and ``first`` resample every channel, then :func:`downmix_channels`.

    A video stream that stops before ``min_coverage`` of its declared duration is :class:`Truncated`.
    """
    if frame_times not in ("centre", "second_start"):
        raise ValueError(f"frame_times must be centre or second_start, got {frame_times!r}")
    path = check_file(path)
    out = Decoded(sample_rate=audio_rate)
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise Unreadable(f"{path}: cannot open the container ({err})") from None
    with container:
        vstream = container.streams.video[0] if container.streams.video else None
        astream = container.streams.audio[0] if container.streams.audio else None
        if video and vstream is None:
            raise NoVideo(f"{path} has no video stream")
        if audio_rate is not None and astream is None:
            raise NoAudio(f"{path} has no audio stream")
        wanted = [s for s in (vstream if video else None, astream if audio_rate else None) if s is not None]
        for s in wanted:
            s.codec_context.thread_count = 1  # one core per prep process; the pool supplies the parallelism
        targets: list[float] = []
        if video:
            declared = _declared_duration(container, vstream)
            if declared is None:
                declared = _probe_duration(path, video=True)
            out.duration = declared or 0.0
            out.fps = float(vstream.average_rate) if vstream.average_rate else None
            targets = second_centres(out.duration) if frame_times == "centre" else []
            step = frame_step(out.fps)
            width, height = resized(vstream.codec_context.width, vstream.codec_context.height, short_side)
        own_mix = downmix != "pyav"
        resampler = None
        if audio_rate:  # planar float keeps the channels apart for our own downmix
            resampler = (
                av.AudioResampler(format="fltp", rate=audio_rate)
                if own_mix
                else av.AudioResampler(format="flt", layout="mono", rate=audio_rate)
            )
        chunks: list[np.ndarray] = []
        prev = None  # the last decoded video frame, shown until the next one starts
        last_time = None
        k = 0
        index = 0  # decoded video frames so far (second_start)
        waiting = None  # second_start with with_next: a kept frame waiting for its successor

        def rgb(frame) -> np.ndarray:
            return frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA").to_ndarray()

        def keep(frame, successor) -> None:
            out.frames.append(rgb(frame))
            if with_next:
                out.next_frames.append(rgb(successor))

        try:
            for packet in container.demux(*wanted):
                for frame in packet.decode():
                    if isinstance(frame, av.AudioFrame):
                        for res in resampler.resample(frame):
                            chunks.append(res.to_ndarray() if own_mix else res.to_ndarray().reshape(-1))
                        continue
                    t = frame.time if frame.time is not None else (0.0 if last_time is None else last_time)
                    if frame_times == "second_start":
                        if waiting is not None:
                            keep(waiting, frame)
                            waiting = None
                        if index % step == 0:
                            out.times.append(t)
                            if with_next:
                                waiting = frame
                            else:
                                keep(frame, frame)
                        index += 1
                    while k < len(targets) and t > targets[k]:
                        keep(prev if prev is not None else frame, frame)
                        out.times.append(targets[k])
                        k += 1
                    prev, last_time = frame, t
        except (av.error.FFmpegError, EOFError) as err:
            if (video and prev is None) or (not video and not chunks):
                raise Unreadable(f"{path}: decoding failed ({err})") from None
            # a broken tail: keep what decoded, the coverage check below decides
        if resampler is not None:
            for res in resampler.resample(None):
                chunks.append(res.to_ndarray() if own_mix else res.to_ndarray().reshape(-1))
            if not chunks:
                out.audio = np.zeros(0, np.float32)
            elif own_mix:
                out.audio = downmix_channels(np.concatenate(chunks, axis=1), downmix).astype(np.float32)
            else:
                out.audio = np.concatenate(chunks).astype(np.float32)
        if video:
            if prev is None:
                raise NoVideo(f"{path}: the video stream has no decodable frame")
            if waiting is not None:  # the last kept frame is its own successor
                keep(waiting, waiting)
            frame_span = 1.0 / out.fps if out.fps else 0.0
            if out.duration and last_time + frame_span < min_coverage * out.duration:
                raise Truncated(
                    f"{path}: video stops at {last_time + frame_span:.2f} s of a declared "
                    f"{out.duration:.2f} s (truncated download?)"
                )
            while k < len(targets):  # the last frame is still on screen at the remaining centres
                keep(prev, prev)
                out.times.append(targets[k])
                k += 1
    return out


# librosa's kaiser_best (resampy) as torchaudio's Kaiser-windowed sinc: the parameters torchaudio's documentation
# gives for matching it
KAISER_BEST = {
    "lowpass_filter_width": 64,
    "rolloff": 0.9475937167399596,
    "resampling_method": "sinc_interp_kaiser",
    "beta": 14.769656459379492,
}


def _resample(wave: np.ndarray, rate: int, target: int, method: str = "sinc") -> np.ndarray:
    if rate == target or wave.size == 0:
        return wave
    import torchaudio.functional as AF

    options = KAISER_BEST if method == "kaiser_best" else {}
    return AF.resample(torch.from_numpy(np.ascontiguousarray(wave)), rate, target, **options).numpy()


def read_wav(path: Path, sample_rate: int, downmix: str = "mean", resample: str = "sinc") -> np.ndarray:
    """A WAV (any soundfile format) as float32 mono at ``sample_rate`` Hz: the channel mean (``downmix`` mean or
    pyav: soundfile has no FFmpeg mix), or channel 0 (``first``), resampled by ``resample`` (sinc: torchaudio's
    default; kaiser_best: librosa's before 0.10)."""
    path = check_file(path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        raise Unreadable(f"{path}: not a readable audio file ({err})") from None
    if data.shape[0] == 0:
        raise EmptyAudio(f"{path} holds no audio samples")
    return _resample(downmix_channels(data.T, downmix), rate, sample_rate, resample).astype(np.float32)


def check_audio(wave: np.ndarray, sample_rate: int, min_seconds: float, path: Path) -> np.ndarray:
    """Refuse empty and near-empty audio (tiling 30 ms to 3 s makes a buzz, not a sample)."""
    if wave is None or wave.size == 0:
        raise EmptyAudio(f"{path}: the audio stream is empty")
    if wave.size < min_seconds * sample_rate:
        raise AudioTooShort(f"{path}: {wave.size / sample_rate:.3f} s of audio, under the minimum {min_seconds} s")
    return wave


def read_jpeg_file(path: Path, short_side: Optional[int], quality: int, gray: bool = False) -> bytes:
    """A JPEG file's bytes, verified by decoding; re-encoded only if its short side must come down."""
    path = check_file(path)
    data = path.read_bytes()
    try:
        img = Image.open(io.BytesIO(data))
        img = img.convert("L" if gray else "RGB")  # decodes the whole image: a broken file fails here
    except (OSError, ValueError) as err:
        raise Unreadable(f"{path}: not a readable JPEG ({err})") from None
    size = resized(img.width, img.height, short_side)
    if size == (img.width, img.height):
        return data
    return encode_frame(img.resize(size, Image.BILINEAR, reducing_gap=None), quality)
