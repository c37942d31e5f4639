"""The released loaders' data choices (docs/method.md §9), each where it acts, on generated media: frame indices,
crop sharing and the evaluation resize, frames as the first frame of each second, the stereo downmix, VGGSound's
segment recipe and its audio window, the official split lists (CREMA-D, Kinetics-Sounds), the caches' recipe
checks, and a tiny end-to-end run under fidelity=official."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from hydra.utils import instantiate

from data_prep import cremad, kinetics_sounds, vggsound
from data_prep.errors import PrepError
from data_prep.media import decode_container
from onthefly.config import compose
from onthefly.data.audio import log_spectrogram, tile_to_length
from onthefly.data.cache import CacheMismatchError, CacheReader, read_index
from onthefly.data.clips import decode_frames
from onthefly.data.sampling import frame_indices
from onthefly.data.transforms import FrameTransform

import media

EMOS = media.EMOTIONS


# --- load time: which frames, which crops ----------------------------------------------------------------------
def test_released_frame_indices():
    assert frame_indices(10, 3, True, "first") == [0, 1, 2] == frame_indices(10, 3, False, "first")
    assert frame_indices(10, 1, True, "first") == [0]
    assert frame_indices(2, 3, True, "first") == [0, 1, 1]  # fewer frames than samples: the last repeats
    assert frame_indices(10, 3, True, "segment_starts") == [0, 3, 6]  # CVPR Kinetics-Sounds: k * floor(10 / 3)
    # the journal's shifted list: entries 0, 4, 9 hold frames 9 (last), 3 (middle - 1), 8 (second-to-last)
    assert frame_indices(10, 3, True, "spread_shifted") == [9, 3, 8] == frame_indices(10, 3, False, "spread_shifted")
    assert frame_indices(8, 3, False, "spread_shifted") == [7, 2, 6]  # floor((8 - 1) / 2) = 3, minus one
    assert frame_indices(1, 3, False, "spread_shifted") == [0, 0, 0]


def _frames(t: int = 3) -> torch.Tensor:
    """t identical uint8 frames with a horizontal and vertical ramp (every crop and flip shows)."""
    ramp = torch.arange(48 * 64).view(48, 64) % 251
    return torch.stack([ramp, ramp.t().reshape(48, 64), (ramp * 7) % 251]).to(torch.uint8)[None].repeat(t, 1, 1, 1)


def test_shared_crops_are_one_per_clip_and_per_frame_crops_differ():
    frames = _frames()
    torch.manual_seed(0)
    shared = FrameTransform(True, 32)(frames)
    assert torch.equal(shared[0], shared[1]) and torch.equal(shared[1], shared[2])
    torch.manual_seed(0)
    own = FrameTransform(True, 32, per_frame=True)(frames)
    assert own.shape == (3, 3, 32, 32)
    assert not torch.equal(own[0], own[1]) and not torch.equal(own[1], own[2])
    torch.manual_seed(0)  # the first frame takes the same draws as the shared clip
    torch.testing.assert_close(own[0], shared[0])


def test_eval_resize_crop_is_resize_then_centre_crop():
    frames = _frames(1)
    squash = FrameTransform(False, 32)(frames)
    crop = FrameTransform(False, 32, eval_resize="crop")(frames)
    tf = FrameTransform(False, 32)
    expected = TF.center_crop(TF.resize(frames.float(), [32], antialias=True), [32, 32])
    torch.testing.assert_close(crop, (expected - tf.mean) / tf.std, atol=0.05, rtol=0)
    assert crop.shape == squash.shape == (1, 3, 32, 32) and not torch.allclose(crop, squash)


# --- prep time: frames, downmix, recipes ----------------------------------------------------------------------
def test_downmix_values_of_a_stereo_track(tmp_path):
    right = media.sine(1000.0, 2.0, 16000, amplitude=0.25)
    path = media.write_video(tmp_path / "s.mp4", 2.0, audio_rate=16000, audio_freq=1000.0, right=right)
    peak = {
        d: float(np.abs(decode_container(path, audio_rate=16000, downmix=d).audio[4000:28000]).max())
        for d in ("pyav", "mean", "first")
    }
    assert peak["first"] == pytest.approx(0.5, abs=0.01)  # channel 0 only
    assert peak["mean"] == pytest.approx(0.375, abs=0.01)  # (0.5 + 0.25) / 2
    assert peak["pyav"] == pytest.approx(0.707 * 0.75, abs=0.015)  # FFmpeg's mono mix: 0.707 each


@pytest.fixture(scope="module")
def official_cremad(tmp_path_factory):
    """Ten CREMA-D clips whose frame i shows colour i, the CVPR lists' form scaled down (9 train / 1 test, as
    6,698 / 744), prepared with the official options into <root>/cremad_official."""
    root = tmp_path_factory.mktemp("official_cremad")
    raw = root / "raw"
    names = [f"{1001 + i}_IEO_{EMOS[i % 6]}_MD" for i in range(10)]
    for name in names:
        media.write_video(raw / "VideoFlash" / f"{name}.flv", 2.5, audio_rate=22050, frame_colours=True)
        media.write_wav(raw / "AudioWAV" / f"{name}.wav", 1.5, freq=media.SINE_HZ)
    lists = media.write_cvpr_cremad_lists(root / "lists", names[1:], names[:1])
    out = root / "data" / "cremad_official"
    summary = media.prep(
        cremad, raw_root=raw, out_root=out, splits=lists, frame_times="second_start", resample="kaiser_best"
    )
    return {"root": root, "raw": raw, "lists": lists, "out": out, "summary": summary, "names": names}


def test_official_lists_give_their_split_sizes(official_cremad):
    summary = official_cremad["summary"]
    assert summary["per_split"]["train"] == {"listed": 9, "cached": 9}
    assert summary["per_split"]["test"] == {"listed": 1, "cached": 1}
    recipe = CacheReader(official_cremad["out"], "cremad").recipe
    assert recipe["splits"]["mode"] == "lists" and recipe["frames"]["times"] == "first frame of each second"
    assert recipe["audio"]["resample"] == "kaiser_best" and "downmix" not in recipe["audio"]


def test_second_start_frames_are_the_first_frame_of_each_second(official_cremad):
    reader = CacheReader(official_cremad["out"], "cremad")
    for _, row in reader.ok_rows().iterrows():
        assert row.n_frames == 3  # 2.5 s at 10 fps: frames 0, 10 and 20
        frames = decode_frames([reader.jpeg(row.frame_start + t) for t in range(3)])
        for t, frame_no in enumerate((0, 10, 20)):
            mean = frames[t].float().mean(dim=(1, 2))
            assert torch.allclose(mean, torch.tensor(media.colour_at(frame_no), dtype=torch.float32), atol=12)


def test_bare_names_lists_and_a_clip_in_two_lists(official_cremad, tmp_path):
    names = official_cremad["names"]
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "train.csv").write_text("\n".join(names[1:]) + "\n")
    (tmp_path / "bare" / "test.csv").write_text(names[0] + "\n")
    entries, _ = cremad.read_lists(tmp_path / "bare")
    clips = [cremad.make_clip(official_cremad["raw"], n, s, e) for n, e, s in entries]
    assert all(c.status == "ok" for c in clips) and {c.label for c in clips} == set(EMOS)
    media.write_cvpr_cremad_lists(tmp_path / "twice", names[:6], names[5:])
    with pytest.raises(PrepError, match=f"1 clip\\(s\\) are listed in two splits: {names[5]} \\(train and test\\)"):
        cremad.read_lists(tmp_path / "twice")


def test_the_reader_refuses_a_cache_of_other_frames_and_names_the_prep(official_cremad):
    clean = instantiate(compose(["dataset=cremad", f"dataset.root={official_cremad['out']}"]).dataset)
    with pytest.raises(CacheMismatchError, match="frames.times: cache has 'first frame of each second'") as err:
        clean.open()
    assert 'ARGS="resample=sinc frame_times=centre"' in str(err.value) and "make prep-cremad" in str(err.value)
    official = instantiate(
        compose(
            ["experiment=tpami2024/cremad", "fidelity=official", f"paths.data_root={official_cremad['root'] / 'data'}"]
        ).dataset
    )
    splits = official.splits()
    assert (len(splits.train), len(splits.test)) == (9, 1) and splits.val is not None and len(splits.val) == 1


def test_official_config_on_a_clean_cache_names_every_prep_option(official_cremad, tmp_path):
    out = tmp_path / "clean"
    media.prep(cremad, raw_root=official_cremad["raw"], out_root=out)  # our seeded split, centre frames
    official = instantiate(compose(["experiment=cvpr2022/cremad", "fidelity=official", f"dataset.root={out}"]).dataset)
    with pytest.raises(CacheMismatchError) as err:
        official.open()
    text = str(err.value)
    assert "splits.mode: cache has 'random', config asks for 'lists'" in text
    assert "audio.resample: cache has 'sinc' (the default, not recorded), config asks for 'kaiser_best'" in text
    assert "SPLITS=/path/to/lists" in text and "frame_times=second_start" in text and "resample=kaiser_best" in text
    missing = instantiate(
        compose(["experiment=cvpr2022/cremad", "fidelity=official", f"dataset.root={tmp_path / 'none'}"]).dataset
    )
    with pytest.raises(Exception, match='SPLITS=/path/to/lists ARGS="frame_times=second_start resample=kaiser_best"'):
        missing.open()  # a missing cache: the prep command already carries the official options


def test_kaiser_best_resampling_is_librosas_filter(tmp_path):
    from data_prep.media import _resample

    wave = media.sine(1000.0, 1.0, 16000)
    sinc, kaiser = _resample(wave, 16000, 22050), _resample(wave, 16000, 22050, "kaiser_best")
    assert sinc.shape == kaiser.shape == (22050,)
    t = np.arange(22050) / 22050
    ideal = 0.5 * np.sin(2 * np.pi * 1000.0 * t).astype(np.float32)
    middle = slice(2000, 20000)  # away from the edges
    assert np.abs(kaiser[middle] - ideal[middle]).max() < 1e-3 and not np.allclose(kaiser, sinc, atol=1e-6)


def _stereo_kinetics(root):
    """Kinetics clips with a stereo track (left: the sine, right: silence) and the CVPR repository's lists
    (my_train.txt / my_test.txt, the label a class number)."""
    rows = {"train": [], "test": []}
    for i, (label, split) in enumerate(
        [("blowing_nose", "train"), ("tap_dancing", "train"), ("playing_bagpipes", "train"), ("tap_dancing", "test")]
    ):
        clip_id = f"{media.ytid(i)}_{10 * i:06d}_{10 * i + 10:06d}"
        media.write_video(
            root / "train" / f"{clip_id}.mp4",
            2.0,
            audio_rate=16000,
            audio_freq=media.SINE_HZ,
            right=np.zeros(1, np.float32),
            shift=i,
        )
        rows[split].append(f"{clip_id},10,{kinetics_sounds.CLASSES.index(label)}")
    (root / "lists").mkdir(parents=True)
    for split, lines in rows.items():
        (root / "lists" / f"my_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_kinetics_lists_with_class_numbers_and_the_downmix_recipe(tmp_path):
    raw = _stereo_kinetics(tmp_path / "raw")
    caches = {}
    for downmix in ("first", "mean"):
        out = tmp_path / downmix
        summary = media.prep(kinetics_sounds, raw_root=raw, out_root=out, lists=raw / "lists", downmix=downmix)
        assert summary["cached"] == 4 and summary["per_split"]["test"] == {"listed": 1, "cached": 1}
        caches[downmix] = CacheReader(out, "kinetics_sounds")
    index = read_index(tmp_path / "first" / "index.csv").set_index("id")
    assert sorted(index["label"]) == ["blowing_nose", "playing_bagpipes", "tap_dancing", "tap_dancing"]
    assert caches["first"].recipe["audio"]["downmix"] == "first"
    # channel 0 carries twice the mean's amplitude: 4x the power, log(4) / (2 * 5.141276) in the normalised fbank
    a = caches["first"].array(0, 0)[:150].max(axis=0)
    b = caches["mean"].array(0, 0)[:150].max(axis=0)
    peak = int(a.argmax())
    assert a[peak] - b[peak] == pytest.approx(np.log(4) / (2 * 5.141276), abs=0.02)
    clean = instantiate(compose(["dataset=kinetics_sounds", f"dataset.root={tmp_path / 'first'}"]).dataset)
    with pytest.raises(CacheMismatchError, match="audio.downmix: cache has 'first', config asks for 'pyav'"):
        clean.open()
    assert instantiate(
        compose(["dataset=kinetics_sounds", f"dataset.root={tmp_path / 'first'}", "dataset.downmix=first"]).dataset
    ).open()
    (raw / "lists" / "train_val.txt").write_text("")
    with pytest.raises(PrepError, match="names several splits"):
        kinetics_sounds.read_lists(raw / "lists")


@pytest.fixture(scope="module")
def segment_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("vgg_segment")
    raw = media.make_vggsound(root / "raw")
    out = root / "cache"
    media.prep(vggsound, raw_root=raw["raw"], csv=raw["csv"], out_root=out, audio="segment", downmix="mean")
    return out


def test_segment_recipe_caches_the_waveform_and_transforms_the_5s_segment(segment_cache):
    reader = CacheReader(segment_cache, "vggsound")
    rec = reader.recipe["audio"]
    assert (rec["name"], rec["kind"], rec["downmix"], reader.array_shape) == ("segment", "waveform", "mean", (160000,))
    ds = instantiate(
        compose(
            [
                "dataset=vggsound",
                f"dataset.root={segment_cache}",
                "dataset.audio_recipe=segment",
                "dataset.downmix=mean",
                "dataset.image_size=32",
            ]
        ).dataset
    )
    splits = ds.splits()
    item = splits.test[0]
    assert item["audio"].shape == (1, 129, 626)
    wave = torch.from_numpy(
        np.array(reader.array(int(splits.test.rows.loc[0, "array_part"]), int(splits.test.rows.loc[0, "array_row"])))
    )
    centre = log_spectrogram(wave[40000:120000].clamp(-1, 1), 256, 128)  # the 5 s from 2.5 s: the centre
    torch.testing.assert_close(item["audio"][0], centre)
    source = segment_cache.parent / "raw" / splits.test.rows.loc[0, "source"]
    decoded = torch.from_numpy(decode_container(source, video=False, audio_rate=16000, downmix="mean").audio)
    torch.testing.assert_close(wave, tile_to_length(decoded, 160000))  # the 2-s clip, tiled to 10 s, not clipped


def test_random_audio_window_at_evaluation_is_fixed_per_clip(segment_cache):
    cfg = [
        "dataset=vggsound",
        f"dataset.root={segment_cache}",
        "dataset.audio_recipe=segment",
        "dataset.downmix=mean",
        "dataset.image_size=32",
        "dataset.modalities=[audio]",
    ]
    centre = instantiate(compose(cfg).dataset).splits().train_eval
    random = instantiate(compose([*cfg, "dataset.audio_eval_window=random"]).dataset).splits().train_eval
    state = torch.get_rng_state()
    first = [random[i]["audio"] for i in range(len(random))]
    assert torch.equal(torch.get_rng_state(), state)  # the evaluation's draws leave the global stream alone
    again = [random[i]["audio"] for i in range(len(random))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # the same window in every evaluation
    assert any(not torch.equal(a, centre[i]["audio"]) for i, a in enumerate(first))


def test_min_frames_leaves_out_short_clips(segment_cache):
    ds = instantiate(
        compose(
            [
                "dataset=vggsound",
                f"dataset.root={segment_cache}",
                "dataset.audio_recipe=segment",
                "dataset.downmix=mean",
                "dataset.min_frames=3",
            ]
        ).dataset
    )
    ok = ds.open().ok_rows()
    assert (ok["n_frames"] == 2).all() and len(ds.usable_rows(ok)) == 0  # 2-s clips: 2 frames each
    assert len(ds.usable_rows(ok.assign(n_frames=[4, 3] * (len(ok) // 2) + [4] * (len(ok) % 2)))) == len(ok)
    ds.min_frames = 4
    assert len(ds.usable_rows(ok.assign(n_frames=[4, 3] * (len(ok) // 2) + [4] * (len(ok) % 2)))) == (len(ok) + 1) // 2


@pytest.mark.slow
def test_one_tiny_run_under_fidelity_official(official_cremad, tmp_path):
    """experiment=tpami2024/cremad fidelity=official on the official cache: OPM with its released gradient, the
    journal's OGM, one fixed frame, selection on test."""
    results = media.train_once(
        "cremad",
        official_cremad["out"],
        tmp_path / "run",
        "experiment=tpami2024/cremad",
        "fidelity=official",
        "modulation=opm_ogm",
        "modulation.opm.p_exe=1.0",
        f"paths.data_root={official_cremad['root'] / 'data'}",
        f"dataset.root={official_cremad['out']}",
        "dataset.image_size=32",
        "backbone=resnet18_small",
        "trainer.batch_size=3",
        "trainer.epochs=1",
    )
    assert results["status"] == "ok" and results["best"]["split"] == "test"
    assert results["config"]["fidelity"] == "official" and results["config"]["release"] == "tpami2024"
    assert results["config"]["modulation"]["opm"]["rescale_grad"] is True
