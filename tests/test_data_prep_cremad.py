"""CREMA-D end to end on generated media: raw FLV + WAV tree with bad inputs -> cache -> reader -> one epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_prep import cremad
from onthefly.config import compose
from onthefly.data.base import CacheMissingError
from onthefly.data.cache import CacheMismatchError, CacheReader, read_index
from onthefly.data.clips import decode_frames
from onthefly.data.cremad import CremaD

import media


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return media.make_cremad(tmp_path_factory.mktemp("cremad_raw"))


@pytest.fixture(scope="module")
def built(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("cremad_cache")
    summary = media.prep(cremad, raw_root=raw["raw"], out_root=out, splits=raw["lists"])
    return out, summary


def test_every_listed_clip_is_in_the_index_and_bad_ones_carry_a_reason(raw, built):
    out, summary = built
    index = read_index(out / "index.csv").set_index("id")
    assert set(index.index) == set(raw["good"]) | set(raw["bad"])
    assert (index.loc[raw["good"], "status"] == "ok").all()
    for name, status in raw["bad"].items():
        assert index.loc[name, "status"] == status, index.loc[name].to_dict()
        assert index.loc[name, "reason"]
    assert "git lfs pull" in index.loc["1020_IEO_ANG_HI", "reason"]
    assert "train list" in index.loc["1090_DFA_HAP_LO", "reason"]
    assert summary["found"] == len(raw["good"]) + len(raw["bad"])
    assert summary["cached"] == len(raw["good"])
    assert summary["skipped"] == {status: 1 for status in raw["bad"].values()}
    assert summary["per_split"]["test"] == {"listed": 6, "cached": 6}
    assert summary["per_split"]["train"] == {"listed": 6 + len(raw["bad"]), "cached": 6}


def test_summary_is_printed_with_counts_reasons_and_the_lfs_advice(raw, tmp_path, capsys):
    media.prep(cremad, raw_root=raw["raw"], out_root=tmp_path, splits=raw["lists"])
    text = capsys.readouterr().out
    assert "17 clips found" in text and "cached" in text and "truncated 1" in text
    assert "git lfs pull" in text and "train" in text and "test" in text


def test_cached_spectrogram_has_the_recipe_shape_and_the_sines_peak(built):
    out, _ = built
    reader = CacheReader(out, "cremad")
    assert reader.array_shape == (257, 188)
    for _, row in reader.ok_rows().iterrows():
        spec = reader.array(row.array_part, row.array_row)
        assert spec.shape == (257, 188) and spec.dtype == np.float32
        assert spec.mean(axis=1).argmax() == round(media.SINE_HZ * 512 / 22050)  # 1 kHz at 22,050 Hz: bin 23


def test_cached_frames_are_the_seconds_centres_with_their_colours(built):
    out, _ = built
    reader = CacheReader(out, "cremad")
    for _, row in reader.ok_rows().iterrows():
        shift = int(row.id[:4]) - 1001
        assert row.n_frames == 3  # a 2.5-s video (its mp3 track makes the container 2.56 s): 0.5, 1.5, 2.5 s
        frames = decode_frames([reader.jpeg(row.frame_start + t) for t in range(row.n_frames)])
        assert frames.shape[1:] == (3, 48, 64)
        for t in range(row.n_frames):
            mean = frames[t].float().mean(dim=(1, 2))
            assert torch.allclose(mean, torch.tensor(media.colour_at(t, shift), dtype=torch.float32), atol=10)


def test_recipe_records_parameters_splits_classes_and_code_version(built, raw):
    out, _ = built
    recipe = CacheReader(out, "cremad").recipe
    assert recipe["audio"]["name"] == "ogm_ge" and recipe["audio"]["hop_length"] == 353
    assert recipe["frames"]["short_side"] == 256 and recipe["classes"] == cremad.EMOTIONS
    assert recipe["splits"]["mode"] == "lists" and recipe["code_version"].startswith("0.1.0")


def test_second_run_does_no_work_and_lfs_pull_redoes_only_that_clip(raw, tmp_path):
    import shutil

    tree = tmp_path / "raw"
    shutil.copytree(raw["raw"], tree)
    out = tmp_path / "cache"
    first = media.prep(cremad, raw_root=tree, out_root=out, splits=tree / "lists")
    journal = (out / "journal.jsonl").read_text()
    index = (out / "index.csv").read_text()
    again = media.prep(cremad, raw_root=tree, out_root=out, splits=tree / "lists")
    assert first["processed_now"] == 16 and again["processed_now"] == 0 and again["reused"] == first["cached"]
    assert (out / "journal.jsonl").read_text() == journal and (out / "index.csv").read_text() == index
    media.write_video(tree / "VideoFlash" / "1020_IEO_ANG_HI.flv", 2.0)  # what `git lfs pull` would bring
    pulled = media.prep(cremad, raw_root=tree, out_root=out, splits=tree / "lists")
    assert pulled["processed_now"] == 1 and pulled["cached"] == first["cached"] + 1
    assert "lfs_pointer" not in pulled["skipped"]


def test_default_split_without_lists_is_seeded_and_stratified(raw, tmp_path):
    clips, info = cremad.list_clips(raw["raw"], cremad.Options(raw_root=str(raw["raw"]), test_share=0.25))
    named = [c for c in clips if c.label]
    assert info["mode"] == "random" and sum(c.split == "test" for c in named) == round(0.25 * len(named))
    again, _ = cremad.list_clips(raw["raw"], cremad.Options(raw_root=str(raw["raw"]), test_share=0.25))
    assert [c.split for c in again] == [c.split for c in clips]
    speaker, info = cremad.list_clips(
        raw["raw"], cremad.Options(raw_root=str(raw["raw"]), split="speaker", test_share=0.25)
    )
    test_actors = {c.id[:4] for c in speaker if c.split == "test"}
    assert test_actors == set(info["test_actors"])
    assert not test_actors & {c.id[:4] for c in speaker if c.split == "train"}


def test_reader_builds_splits_with_the_class_count_from_the_cache(built):
    out, _ = built
    cfg = compose(["dataset=cremad", f"dataset.root={out}", "dataset.image_size=32", "dataset.num_frames=2"])
    from hydra.utils import instantiate

    splits = instantiate(cfg.dataset).splits()
    assert splits.num_classes == 6 and splits.class_names == cremad.EMOTIONS
    assert len(splits.test) == 6 and len(splits.train) + len(splits.val) == 6 and len(splits.val) >= 1
    item = splits.train[0]
    assert item["audio"].shape == (1, 257, 188) and item["visual"].shape == (2, 3, 32, 32)
    assert 0 <= item["label"] < 6
    a, b = splits.test[3], splits.test[3]
    assert torch.equal(a["visual"], b["visual"]) and torch.equal(a["audio"], b["audio"])  # evaluation is deterministic


def test_missing_cache_names_the_prep_command(tmp_path):
    with pytest.raises(CacheMissingError, match="make prep-cremad RAW="):
        CremaD(root=str(tmp_path / "nothing")).splits()


def test_recipe_mismatch_is_refused_with_the_command_that_fixes_it(built):
    out, _ = built
    with pytest.raises(CacheMismatchError, match=r"audio.name.*ogm_ge.*fbank(.|\n)*make prep-cremad .*AUDIO=fbank"):
        CremaD(root=str(out), audio_recipe="fbank").splits()
    with pytest.raises(CacheMismatchError, match="short_side=128"):
        CremaD(root=str(out), frame_short_side=128).splits()
    with pytest.raises(CacheMismatchError, match="SPLIT=random"):
        CremaD(root=str(out), split="random").splits()


def test_writer_refuses_to_mix_recipes_in_one_folder(raw, built):
    out, _ = built
    from data_prep.cache import CacheConflict

    with pytest.raises(CacheConflict, match="overwrite=true"):
        media.prep(cremad, raw_root=raw["raw"], out_root=out, splits=raw["lists"], audio="fbank")


@pytest.mark.slow
def test_process_pool_gives_the_same_cache(raw, built, tmp_path):
    out, _ = built
    media.prep(cremad, raw_root=raw["raw"], out_root=tmp_path, splits=raw["lists"], workers=2)
    one, two = CacheReader(out, "cremad"), CacheReader(tmp_path, "cremad")
    rows = two.ok_rows().set_index("id")
    for _, row in one.ok_rows().iterrows():
        other = rows.loc[row.id]
        assert np.array_equal(one.array(row.array_part, row.array_row), two.array(other.array_part, other.array_row))
        assert one.jpeg(row.frame_start) == two.jpeg(other.frame_start)


@pytest.mark.slow
def test_one_epoch_trains_on_the_prepared_cache(built, tmp_path):
    out, _ = built
    results = media.train_once("cremad", out, tmp_path / "run", "modulation=ogm_ge")
    assert results["status"] == "ok" and results["num_classes"] == 6
    assert np.isfinite(results["test"]["loss"]) and 0 <= results["test"]["acc"] <= 1


@pytest.mark.slow
def test_loader_workers_read_the_cache(built):
    from torch.utils.data import DataLoader

    out, _ = built
    test = CremaD(root=str(out), image_size=32).splits().test
    batches = list(DataLoader(test, batch_size=4, num_workers=2))  # the presets use loader workers
    assert sum(len(b["label"]) for b in batches) == len(test) == 6
    assert batches[0]["audio"].shape == (4, 1, 257, 188) and batches[0]["visual"].shape == (4, 1, 3, 32, 32)
    assert torch.equal(batches[0]["audio"][0], test[0]["audio"])
