"""Unit tests of the prep's shared parts: decoding, frame times, recipes, splits, names, arguments, sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.compliance.kaldi as kaldi

from data_prep import audio as recipes
from data_prep import media as pm
from data_prep.cremad import EMOTIONS, PUBLISHED_TEST_SHARE
from data_prep.errors import UsageError
from data_prep.ids import VideoFiles, parse
from data_prep.pipeline import CommonOptions, parse_args, stratified_test
from data_prep.vggsound import read_csv
from onthefly.data.cache import audio_recipe
from onthefly.data.clips import RGBFlowTransform, decode_frames
from onthefly.data.sampling import crop_start, frame_indices

import media


# --- frame times and sizes -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "duration,expected",
    [
        (2.5, [0.5, 1.5]),
        (2.6, [0.5, 1.5, 2.5]),
        (3.0, [0.5, 1.5, 2.5]),
        (0.3, [0.15]),
        (0.0, []),
    ],
)
def test_frames_are_taken_at_the_centre_of_each_second(duration, expected):
    assert pm.second_centres(duration) == pytest.approx(expected)


def test_ten_second_clip_gives_ten_frames():
    assert len(pm.second_centres(10.0)) == 10


@pytest.mark.parametrize(
    "size,short,expected",
    [
        ((480, 360), 256, (341, 256)),
        ((340, 256), 256, (340, 256)),
        ((320, 240), 256, (320, 240)),
        ((360, 640), 256, (256, 455)),
        ((480, 360), 0, (480, 360)),
    ],
)
def test_short_side_comes_down_never_up(size, short, expected):
    assert pm.resized(*size, short) == expected


# --- bad files -----------------------------------------------------------------------------------------------
def test_lfs_pointer_is_recognised_and_the_message_says_git_lfs_pull(tmp_path):
    path = media.write_lfs_pointer(tmp_path / "a.flv")
    with pytest.raises(pm.LfsPointer, match="git lfs pull"):
        pm.check_file(path)
    assert pm.LfsPointer.status == "lfs_pointer"


def test_missing_and_empty_files_are_told_apart(tmp_path):
    with pytest.raises(pm.MissingFile):
        pm.check_file(tmp_path / "absent.wav")
    (tmp_path / "zero.wav").write_bytes(b"")
    with pytest.raises(pm.EmptyFile):
        pm.read_wav(tmp_path / "zero.wav", 16000)


def test_wav_with_a_header_and_no_samples_is_empty_audio(tmp_path):
    sf.write(str(tmp_path / "e.wav"), np.zeros(0, np.float32), 16000)
    with pytest.raises(pm.EmptyAudio):
        pm.read_wav(tmp_path / "e.wav", 16000)


def test_near_empty_audio_is_refused_not_tiled():
    with pytest.raises(pm.AudioTooShort):
        pm.check_audio(np.zeros(100, np.float32), 16000, 0.1, "x.wav")
    assert pm.check_audio(np.zeros(1600, np.float32), 16000, 0.1, "x.wav").size == 1600


def test_container_without_audio_raises_no_audio(tmp_path):
    path = media.write_video(tmp_path / "silent.mp4", 1.0, audio_freq=None)
    with pytest.raises(pm.NoAudio):
        pm.decode_container(path, audio_rate=16000)
    assert len(pm.decode_container(path).frames) == 1  # the video alone is fine


def test_truncated_container_is_refused_with_a_reason(tmp_path):
    mp4 = media.truncate(media.write_video(tmp_path / "t.mp4", 2.0), 0.5)
    flv = media.truncate(media.write_video(tmp_path / "t.flv", 3.0, audio_freq=None), 0.35)
    for path in (mp4, flv):
        with pytest.raises(pm.MediaError) as info:
            pm.decode_container(path, audio_rate=16000 if path.suffix == ".mp4" else None)
        assert info.value.status in ("unreadable", "truncated") and str(path) in str(info.value)


def test_garbage_bytes_are_unreadable(tmp_path):
    (tmp_path / "junk.avi").write_bytes(b"\x00RIFF" + bytes(range(256)) * 8)
    with pytest.raises(pm.Unreadable):
        pm.decode_container(tmp_path / "junk.avi")


# --- decoding ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".flv", ".mp4", ".avi"])
def test_each_frame_shows_its_seconds_colour_after_jpeg(tmp_path, suffix):
    path = media.write_video(
        tmp_path / f"c{suffix}",
        3.0,
        size=(96, 64),
        fps=10,
        shift=2,
        audio_freq=None if suffix == ".avi" else 440.0,
        audio_rate=22050 if suffix == ".flv" else 16000,
    )
    decoded = pm.decode_container(path, short_side=32)
    assert decoded.times == pytest.approx([0.5, 1.5, 2.5])
    jpegs = [pm.encode_frame(f, 90) for f in decoded.frames]
    frames = decode_frames(jpegs)
    assert frames.shape == (3, 3, 32, 48)  # short side 64 -> 32, aspect kept
    for k, frame in enumerate(frames):
        mean = frame.float().mean(dim=(1, 2))
        assert torch.allclose(mean, torch.tensor(media.colour_at(k, 2), dtype=torch.float32), atol=10), (k, mean)


def test_container_audio_is_resampled_to_mono_at_the_target_rate(tmp_path):
    path = media.write_video(tmp_path / "a.mp4", 2.0, audio_freq=1000.0, audio_rate=44100)
    decoded = pm.decode_container(path, video=False, audio_rate=16000)
    assert decoded.audio.ndim == 1 and abs(decoded.audio.size - 32000) < 2048  # AAC pads a frame or two
    spectrum = np.abs(np.fft.rfft(decoded.audio[4000:20000]))
    assert np.fft.rfftfreq(16000, 1 / 16000)[spectrum.argmax()] == pytest.approx(1000, abs=2)


def test_wav_is_resampled(tmp_path):
    path = media.write_wav(tmp_path / "a.wav", 1.0, freq=1000.0, rate=16000)
    wave = pm.read_wav(path, 22050)
    assert wave.dtype == np.float32 and wave.size == 22050


def test_flow_jpeg_bytes_are_kept_as_they_are_when_small_enough(tmp_path):
    media.write_flow_jpegs(tmp_path / "u", 1, size=(64, 48), gradient=True)
    path = tmp_path / "u" / "frame000001.jpg"
    assert pm.read_jpeg_file(path, 256, 90, gray=True) == path.read_bytes()
    smaller = decode_frames([pm.read_jpeg_file(path, 24, 90, gray=True)], gray=True)
    assert smaller.shape == (1, 1, 24, 32)
    assert smaller[0, 0, :, 0].float().mean() < 60 < 200 < smaller[0, 0, :, -1].float().mean()  # the gradient survives


# --- recipes -------------------------------------------------------------------------------------------------
def _peak_bin(spec: np.ndarray) -> int:
    return int(spec.astype(np.float32).mean(axis=-1).argmax())


@pytest.mark.parametrize(
    "dataset,name,rate,n_fft",
    [
        ("cremad", "ogm_ge", 22050, 512),
        ("kinetics_sounds", "stft", 16000, 512),
        ("vggsound", "ogm_ge", 16000, 256),
    ],
)
def test_stft_recipes_have_their_shape_and_a_sine_peaks_at_its_bin(dataset, name, rate, n_fft):
    rec = audio_recipe(dataset, name)
    spec = recipes.compute(media.sine(1000.0, 1.3, rate), rec)
    assert list(spec.shape) == rec["shape"] and spec.dtype == np.dtype(rec["dtype"])
    assert _peak_bin(spec) == round(1000.0 * n_fft / rate)
    assert np.isfinite(spec.astype(np.float32)).all()


def test_cremad_recipe_tiles_a_short_clip_to_three_seconds():
    rec = audio_recipe("cremad", "ogm_ge")
    short = recipes.compute(media.sine(1000.0, 0.5, 22050), rec)
    assert short.shape == (257, 188)
    sine_bin = round(1000.0 * 512 / 22050)
    head, tail = short[sine_bin, 10:40].mean(), short[sine_bin, 150:180].mean()
    assert tail > 0 and abs(head - tail) < 0.5  # the tone goes on after 0.5 s: no silent (log 1e-7 = -16) tail


def _mel_centres(num_bins: int, rate: int) -> np.ndarray:
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731 (kaldi's HTK mel scale)
    low, high = mel(20.0), mel(rate / 2)
    centres = low + (np.arange(num_bins) + 1) * (high - low) / (num_bins + 1)
    return 700.0 * (np.exp(centres / 1127.0) - 1.0)


@pytest.mark.parametrize("dataset", ["kinetics_sounds", "cremad"])
def test_fbank_recipes_pad_normalise_and_peak_at_the_sines_mel_bin(dataset):
    rec = audio_recipe(dataset, "fbank")
    wave = media.sine(1000.0, 2.0, 16000)
    feats = recipes.compute(wave, rec)
    assert list(feats.shape) == rec["shape"]
    expected_bin = int(np.abs(_mel_centres(128, 16000) - 1000.0).argmin())
    assert abs(int(feats[:150].mean(axis=0).argmax()) - expected_bin) <= 1
    if dataset == "kinetics_sounds":  # 2 s = 198 frames, then zero padding, then (x + 4.503877) / 10.282552
        direct = kaldi.fbank(
            torch.from_numpy(wave - wave.mean())[None],
            sample_frequency=16000,
            num_mel_bins=128,
            frame_length=25.0,
            frame_shift=10.0,
            window_type="hanning",
            dither=0.0,
            use_energy=False,
            htk_compat=True,
        )
        assert direct.shape[0] == 198
        assert np.allclose(feats[:198], (direct.numpy() + 4.503877) / (5.141276 * 2), atol=1e-5)
        assert np.allclose(feats[198:], 4.503877 / (5.141276 * 2), atol=1e-6)


def test_empty_wave_never_reaches_a_recipe():
    with pytest.raises(ValueError, match="empty"):
        recipes.compute(np.zeros(0, np.float32), audio_recipe("cremad", "ogm_ge"))


# --- splits, names, csv, arguments ---------------------------------------------------------------------------
def test_default_cremad_split_has_the_published_sizes_and_is_stratified():
    labels = [EMOTIONS[i % 6] if i < 7200 else "NEU" for i in range(7442)]
    mask = stratified_test(labels, int(round(7442 * PUBLISHED_TEST_SHARE)), seed=0)
    assert mask.sum() == 744 and (~mask).sum() == 6698
    labels = np.array(labels)
    for emo in EMOTIONS:
        share = mask[labels == emo].mean()
        assert share == pytest.approx(744 / 7442, abs=0.002)
    assert (stratified_test(labels, 744, seed=0) == mask).all()
    assert (stratified_test(labels, 744, seed=1) != mask).any()


@pytest.mark.parametrize(
    "name,expected",
    [
        ("-abc_DEF12g_000030_000040", ("-abc_DEF12g", 30, 40)),
        ("-abc_DEF12g_30", ("-abc_DEF12g", 30, None)),
        ("abcdefghijk_000007", ("abcdefghijk", 7, None)),
        ("short_12", None),
    ],
)
def test_youtube_names_parse_with_underscores_inside_the_id(name, expected):
    assert parse(name) == expected


def test_clip_files_resolve_in_every_name_form(tmp_path):
    for stem in ("-abc_DEF12g_000030_000040", "zyxwvutsrqp_7"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        (tmp_path / "sub" / f"{stem}.mp4").write_bytes(b"x")
    files = VideoFiles([tmp_path])
    assert files.find("-abc_DEF12g_000030_000040").name == "-abc_DEF12g_000030_000040.mp4"
    assert files.find("-abc_DEF12g_30").name == "-abc_DEF12g_000030_000040.mp4"  # the lab's test-list form
    assert files.find("zyxwvutsrqp_000007").name == "zyxwvutsrqp_7.mp4"  # unpadded file, padded id
    assert files.find("zyxwvutsrqp_000008") is None


def test_vggsound_csv_keeps_quoted_commas_and_reports_bad_rows(tmp_path):
    path = tmp_path / "v.csv"
    path.write_text(
        '---g-f_I2yQ,1,"people marching, chanting",test\nabcdefghijk,30,dog barking,train\n'
        "broken,row\nabcdefghijk,x,dog barking,train\n"
    )
    rows, bad = read_csv(path)
    assert rows == [
        ("---g-f_I2yQ", 1, "people marching, chanting", "test"),
        ("abcdefghijk", 30, "dog barking", "train"),
    ]
    assert [line for line, _ in bad] == [3, 4]


def test_arguments_are_typed_and_mistakes_exit_with_usage(capsys):
    opts = parse_args(["raw_root=/r", "workers=3", "overwrite=true", "out_root=null"], CommonOptions, "u")
    assert (opts.raw_root, opts.workers, opts.overwrite, opts.out_root) == ("/r", 3, True, None)
    for argv in (["raw_root=/r", "wrkers=3"], ["raw_root=/r", "workers=many"], ["workers=2"], ["raw_root"]):
        with pytest.raises(UsageError, match="usage: u") as err:
            parse_args(argv, CommonOptions, "u")
        assert err.value.exit_code == 2


# --- load-time sampling and the joint RGB + flow transform ----------------------------------------------------
def test_eval_sampling_takes_segment_centres_and_training_stays_in_segments():
    assert frame_indices(10, 3, train=False) == [1, 5, 8]
    assert frame_indices(10, 1, train=False) == [5]
    assert frame_indices(2, 3, train=False) == [0, 1, 1]  # fewer frames than samples: repeats
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        idx = frame_indices(10, 3, train=True, generator=g)
        assert 0 <= idx[0] <= 3 and 3 <= idx[1] <= 6 and 6 <= idx[2] <= 9
    assert frame_indices(10, 3, train=True, mode="spread") == [0, 4, 9] == frame_indices(10, 3, False, "spread")


def test_audio_crop_is_centred_in_evaluation_and_random_in_training():
    assert crop_start(1251, 626, train=False) == 312
    starts = {crop_start(1251, 626, train=True) for _ in range(30)}
    assert len(starts) > 1 and all(0 <= s <= 625 for s in starts)


def test_rgb_and_flow_share_one_flip_and_the_flip_negates_u():
    torch.manual_seed(0)
    h = w = 8
    ramp = torch.linspace(0, 255, w).round().to(torch.uint8).expand(2, 1, h, w)
    rgb = torch.cat([ramp, 255 - ramp, ramp // 2], dim=1)  # [T=2, 3, H, W], varies left to right
    u = torch.full((2, 1, h, w), 200, dtype=torch.uint8)  # moving right
    u[..., : w // 2] = 90  # and a different motion on the left half
    flow = torch.cat([u, ramp], dim=1)
    nxt = rgb.roll(1, dims=-1)  # the next frame: everything moved one pixel right
    plain_rgb, plain_flow, plain_diff = RGBFlowTransform(False, w)(rgb, flow, nxt)
    assert torch.allclose(plain_diff, (nxt.float() - rgb.float()) / 255 / 0.226, atol=1e-4)
    seen = set()
    train = RGBFlowTransform(True, w, scale=(1.0, 1.0))
    for _ in range(40):
        out_rgb, out_flow, out_diff = train(rgb, flow, nxt)
        if torch.allclose(out_rgb, plain_rgb, atol=1e-4):
            seen.add("kept")
            assert torch.allclose(out_flow, plain_flow, atol=1e-4) and torch.allclose(out_diff, plain_diff, atol=1e-4)
        else:
            seen.add("flipped")
            assert torch.allclose(out_rgb, plain_rgb.flip(-1), atol=1e-4)
            assert torch.allclose(out_flow[:, 0], -plain_flow[:, 0].flip(-1), atol=1e-4)  # u mirrored and negated
            assert torch.allclose(out_flow[:, 1], plain_flow[:, 1].flip(-1), atol=1e-4)  # v mirrored only
            assert torch.allclose(out_diff, plain_diff.flip(-1), atol=1e-4)  # the difference is mirrored with them
    assert seen == {"kept", "flipped"}
    assert math.isclose(float(plain_flow[0, 0, 0, -1]), (200 / 255 - 0.5) / 0.226, rel_tol=1e-5)
