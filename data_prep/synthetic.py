"""Generated media in real containers and codecs (no dataset can be downloaded where the tests and the prep
benchmark run): flat-colour frames that change each second, and a sine audio track.

Containers and codecs as the datasets ship them: FLV (Sorenson flv1 video + MP3 audio) for CREMA-D, MP4
(H.264 + AAC) for Kinetics and VGGSound, AVI (MPEG-4 part 2, no audio) for UCF-101; WAV (16-bit PCM) via
soundfile.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Optional

import av
import numpy as np
import soundfile as sf

PALETTE = [(200, 40, 40), (40, 180, 60), (50, 70, 210), (220, 200, 40), (150, 60, 170), (30, 190, 190)]
CODECS = {".flv": ("flv1", "mp3"), ".mp4": ("libx264", "aac"), ".avi": ("mpeg4", None)}  # suffix -> (video, audio)


def colour_at(second: int, shift: int = 0) -> tuple[int, int, int]:
    return PALETTE[(second + shift) % len(PALETTE)]


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def _scene(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random grayscale scene in [-1, 1] (noise blurred at several scales), about as compressible as
    a natural image, so the bench's JPEG sizes mean something."""
    scene = np.zeros((h, w), np.float32)
    for cell, weight in ((32, 1.0), (8, 0.5), (2, 0.2)):
        small = rng.normal(size=(h // cell + 2, w // cell + 2)).astype(np.float32)
        rows = np.linspace(0, small.shape[0] - 1.001, h)
        cols = np.linspace(0, small.shape[1] - 1.001, w)
        r0, c0 = rows.astype(int), cols.astype(int)
        fr, fc = (rows - r0)[:, None], (cols - c0)[None, :]
        up = (
            small[r0][:, c0] * (1 - fr) * (1 - fc)
            + small[r0 + 1][:, c0] * fr * (1 - fc)
            + small[r0][:, c0 + 1] * (1 - fr) * fc
            + small[r0 + 1][:, c0 + 1] * fr * fc
        )
        scene += weight * up
    return np.clip(scene / 2.0, -1, 1)


def write_video(
    path: Path,
    seconds: float,
    *,
    size=(64, 48),
    fps: int = 10,
    audio_freq: Optional[float] = 440.0,
    audio_rate: int = 22050,
    shift: int = 0,
    noise: float = 0.0,
    seed: int = 0,
    textured: bool = False,
    right: Optional[np.ndarray] = None,
    frame_colours: bool = False,
) -> Path:
    """A clip whose frames are colour_at(second) and whose audio is a sine. ``textured``: the colour tints a
    smooth scene panning sideways (realistic JPEG sizes); ``noise``: pixel noise of that standard deviation.
    ``right``: a stereo track, the sine on the left channel and these samples (at ``audio_rate``) on the right.
    ``frame_colours``: frame i shows colour_at(i) instead (a test can tell which frame of a second was kept)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vcodec, acodec = CODECS[path.suffix]
    w, h = size
    rng = np.random.default_rng(seed)
    scene = _scene(h, w + fps * int(seconds + 1), rng) if textured else None
    with av.open(str(path), "w") as container:
        vs = container.add_stream(vcodec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        if vcodec == "libx264":
            vs.options = {"preset": "ultrafast"}
        astream = None
        if audio_freq is not None and acodec is not None:
            astream = container.add_stream(acodec, rate=audio_rate)
            layout = "mono" if right is None else "stereo"
            astream.layout = layout
        for i in range(int(round(seconds * fps))):
            img = np.empty((h, w, 3), np.uint8)
            img[:] = colour_at(i if frame_colours else int(i / fps), shift)
            if scene is not None:
                view = scene[:, i : i + w, None]  # pan one pixel per frame
                img = np.clip(img * (0.6 + 0.4 * view) + 60 * view, 0, 255).astype(np.uint8)
            if noise:
                img = np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in vs.encode(frame):
                container.mux(packet)
        for packet in vs.encode():
            container.mux(packet)
        if astream is not None:
            wave = sine(audio_freq, seconds, audio_rate)[None]
            if right is not None:
                other = np.zeros(wave.shape[1], np.float32)
                other[: min(len(right), len(other))] = right[: len(other)]
                wave = np.concatenate([wave, other[None]])
            fmt = astream.codec_context.format.name  # e.g. fltp (aac) or s16p (mp3)
            step = astream.codec_context.frame_size or 1024
            for start in range(0, wave.shape[1], step):
                chunk = wave[:, start : start + step]
                if chunk.shape[1] < step:
                    chunk = np.pad(chunk, ((0, 0), (0, step - chunk.shape[1])))
                data = chunk if fmt.endswith("p") else chunk.T.reshape(1, -1)  # planar, or interleaved
                if fmt.startswith("s16"):
                    data = (data * 32767).astype(np.int16)
                elif fmt.startswith("s32"):
                    data = (data * 2147483647.0).astype(np.int32)
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout=layout)
                frame.sample_rate, frame.pts, frame.time_base = audio_rate, start, Fraction(1, audio_rate)
                for packet in astream.encode(frame):
                    container.mux(packet)
            for packet in astream.encode():
                container.mux(packet)
    return path


def write_wav(path: Path, seconds: float, freq: float = 1000.0, rate: int = 16000) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), sine(freq, seconds, rate), rate, subtype="PCM_16")
    return path
