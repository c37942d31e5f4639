"""Kinetics-Sounds end to end on generated media: Kinetics-400 layout (mp4: H.264 + AAC) -> cache -> reader -> epoch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_prep import kinetics_sounds as ks
from onthefly.data.cache import CacheMismatchError, CacheReader, read_index
from onthefly.data.kinetics_sounds import KineticsSounds

import media


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return media.make_kinetics(tmp_path_factory.mktemp("ks_raw"))


@pytest.fixture(scope="module")
def built(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("ks_cache")
    return out, media.prep(ks, raw_root=raw["raw"], out_root=out)


def test_the_31_classes_in_alphabetical_order():
    assert len(ks.CLASSES) == 31 and ks.CLASSES == sorted(ks.CLASSES)
    assert not {"typing", "fingerpicking", "patting"} & set(ks.CLASSES)


def test_annotations_give_train_and_test_of_the_31_classes_only(raw, built):
    out, summary = built
    index = read_index(out / "index.csv").set_index("id")
    assert set(index.index) == set(raw["clips"]) | set(raw["bad"])  # abseiling rows are not Kinetics-Sounds
    for clip_id, (label, split) in raw["clips"].items():
        assert (index.loc[clip_id, "label"], index.loc[clip_id, "split"], index.loc[clip_id, "status"]) == (
            label,
            split,
            "ok",
        )
    for clip_id, status in raw["bad"].items():
        assert index.loc[clip_id, "status"] == status and index.loc[clip_id, "reason"]
    assert summary["skipped"] == {"no_audio": 1, "unreadable": 1, "missing": 1}
    assert CacheReader(out, "kinetics_sounds").recipe["splits"]["mode"] == "kinetics400"


def test_fbank_is_cached_at_1024_by_128_with_a_2s_clip_zero_padded(built):
    out, _ = built
    reader = CacheReader(out, "kinetics_sounds")
    row = reader.ok_rows().iloc[0]
    fbank = reader.array(row.array_part, row.array_row)
    assert fbank.shape == (1024, 128)
    assert np.allclose(fbank[300:], 4.503877 / (5.141276 * 2), atol=1e-6)  # padding, normalised
    assert fbank[:150].std() > 0.05
    assert row.n_frames == 2  # 2 s -> frames at 0.5 and 1.5 s


def test_lists_resolve_both_id_forms_and_the_json_database(raw, tmp_path):
    train = [(cid, 10, label.replace("_", " ")) for cid, (label, s) in raw["clips"].items() if s == "train"]
    test = []
    for cid, (label, s) in raw["clips"].items():
        if s == "test":  # the lab's test form: <ytid>_<int start>
            yt, start = cid[:11], int(cid[12:18])
            test.append((f"{yt}_{start}", 10, label))
    media.write_csv(tmp_path / "lists" / "train.txt", train)
    media.write_csv(tmp_path / "lists" / "test.txt", test)
    clips, info = ks.list_clips(raw["raw"], ks.Options(raw_root=str(raw["raw"]), lists=str(tmp_path / "lists")))
    assert info["mode"] == "lists" and all(c.status == "ok" for c in clips)
    assert len(clips) == len(raw["clips"]) and {c.split for c in clips} == {"train", "test"}
    database = {
        "labels": ks.CLASSES,
        "database": {
            cid: {"subset": {"train": "training", "test": "validation"}[s], "annotations": {"label": label}}
            for cid, (label, s) in raw["clips"].items()
        },
    }
    (tmp_path / "ks.json").write_text(json.dumps(database))
    clips, _ = ks.list_clips(raw["raw"], ks.Options(raw_root=str(raw["raw"]), lists=str(tmp_path / "ks.json")))
    assert all(c.status == "ok" for c in clips) and {c.split for c in clips} == {"train", "val"}


def test_reader_spread_sampling_and_the_112_preset(built):
    out, _ = built
    splits = KineticsSounds(root=str(out), image_size=112, sampling="spread", crop_scale=[0.25, 1.0]).splits()
    assert splits.num_classes == 31
    item = splits.train[0]
    assert item["audio"].shape == (1, 1024, 128) and item["visual"].shape == (3, 3, 112, 112)
    assert len(splits.val) >= 1 and len(splits.test) == 3


def test_stft_option_is_refused_by_an_fbank_cache(built):
    out, _ = built
    with pytest.raises(CacheMismatchError, match="AUDIO=stft"):
        KineticsSounds(root=str(out), audio_recipe="stft").splits()


@pytest.mark.slow
def test_one_epoch_trains_on_the_prepared_cache(built, tmp_path):
    out, _ = built
    results = media.train_once("kinetics_sounds", out, tmp_path / "run", "modulation=opm")
    assert results["status"] == "ok" and results["num_classes"] == 31
    assert np.isfinite(results["test"]["loss"])
