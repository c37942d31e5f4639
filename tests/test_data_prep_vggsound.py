"""VGGSound end to end on generated media: csv with quoted commas, padded and unpadded names, shards + merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_prep import vggsound
from data_prep.errors import PrepError
from onthefly.data.base import CacheDamagedError
from onthefly.data.cache import CacheReader, read_index
from onthefly.data.vggsound import VGGSound

import media


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return media.make_vggsound(tmp_path_factory.mktemp("vgg_raw"))


@pytest.fixture(scope="module")
def built(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("vgg_cache")
    return out, media.prep(vggsound, raw_root=raw["raw"], csv=raw["csv"], out_root=out)


def test_labels_sorted_names_found_in_every_form_and_coverage_per_split(raw, built):
    out, summary = built
    reader = CacheReader(out, "vggsound")
    assert reader.classes == raw["labels"] and "people marching, chanting" in reader.classes
    index = read_index(out / "index.csv").set_index("id")
    for clip_id, (label, split) in raw["clips"].items():
        assert (index.loc[clip_id, "label"], index.loc[clip_id, "split"], index.loc[clip_id, "status"]) == (
            label,
            split,
            "ok",
        )
    for clip_id, status in raw["bad"].items():
        assert index.loc[clip_id, "status"] == status and index.loc[clip_id, "reason"]
    assert summary["skipped"] == {"missing": 1, "no_audio": 1, "bad_row": 1}
    assert summary["per_split"]["test"] == {"listed": 4, "cached": 3}
    assert summary["per_split"]["train"] == {"listed": 10, "cached": 9}


def test_whole_clip_spectrogram_is_cached_and_cropped_at_load_time(built):
    out, _ = built
    reader = CacheReader(out, "vggsound")
    row = reader.ok_rows().iloc[0]
    spec = reader.array(row.array_part, row.array_row)
    assert spec.shape == (129, 1251) and spec.dtype == np.float16
    assert int(spec.astype(np.float32).mean(axis=1).argmax()) == round(media.SINE_HZ * 256 / 16000)
    splits = VGGSound(root=str(out), image_size=32).splits()
    assert splits.num_classes == 3
    test_item = splits.test[0]
    assert test_item["audio"].shape == (1, 129, 626) and test_item["visual"].shape == (3, 3, 32, 32)
    full = torch.from_numpy(
        np.asarray(reader.array(*(splits.test.rows.loc[0, ["array_part", "array_row"]].astype(int))), dtype=np.float32)
    )
    assert torch.equal(test_item["audio"][0], full[:, 312:938])  # evaluation: the centre 5 s
    train_crops = {tuple(splits.train[0]["audio"][0, 0, :3].tolist()) for _ in range(8)}
    assert len(train_crops) > 1  # training: a random window (the clip is a tiled 2-s sine, so windows differ)


def test_shards_then_merge_equal_the_single_run(raw, built, tmp_path):
    out, _ = built
    for i in range(2):
        media.prep(vggsound, raw_root=raw["raw"], csv=raw["csv"], out_root=tmp_path, shard=f"{i}/2")
    assert (tmp_path / "shards" / "0-of-2" / "index.csv").exists()
    (tmp_path / "shards" / "2-of-3").mkdir()  # a stray folder from another shard count is refused
    with pytest.raises(PrepError, match=r"mixes shard counts \[2, 3\]"):
        vggsound.run(["merge", f"out_root={tmp_path}"])
    (tmp_path / "shards" / "2-of-3").rmdir()
    summary = vggsound.run(["merge", f"out_root={tmp_path}"])
    assert summary["cached"] == 12 and summary["found"] == 15
    single, merged = CacheReader(out, "vggsound"), CacheReader(tmp_path, "vggsound")
    rows = merged.ok_rows().set_index("id")
    assert set(rows.index) == set(single.ok_rows()["id"])
    for _, row in single.ok_rows().iterrows():
        other = rows.loc[row.id]
        assert np.array_equal(
            single.array(row.array_part, row.array_row), merged.array(other.array_part, other.array_row)
        )
        assert single.jpeg(row.frame_start + row.n_frames - 1) == merged.jpeg(other.frame_start + other.n_frames - 1)
    assert all(p.startswith("shards/") for p in merged.layout["array"]["parts"])
    assert len(VGGSound(root=str(tmp_path)).splits().test) == 3


def test_merge_refuses_missing_shards(raw, tmp_path):
    media.prep(vggsound, raw_root=raw["raw"], csv=raw["csv"], out_root=tmp_path, shard="1/3")
    with pytest.raises(PrepError, match=r"shards \[0, 2\] of 3"):
        vggsound.run(["merge", f"out_root={tmp_path}"])
    assert vggsound.run(["merge", f"out_root={tmp_path}", "allow_partial=true"])["shards"] == "1 of 3"


def test_a_cut_part_of_a_merged_cache_names_its_shard_and_the_shard_prep_then_merge_repairs_it(raw, tmp_path):
    for i in range(2):
        media.prep(vggsound, raw_root=raw["raw"], csv=raw["csv"], out_root=tmp_path, shard=f"{i}/2")
    vggsound.run(["merge", f"out_root={tmp_path}"])
    media.truncate(tmp_path / "shards" / "1-of-2" / "frames" / "part-00000.bin", 0.5)
    with pytest.raises(CacheDamagedError) as err:
        VGGSound(root=str(tmp_path)).splits()
    text = str(err.value)
    assert "shards/1-of-2/frames/part-00000.bin" in text and "Clips affected" in text
    assert f"make prep-vggsound RAW=/path/to/vggsound CSV=/path/to/vggsound.csv OUT={tmp_path} SHARD=1/2" in text
    assert f"make prep-vggsound-merge OUT={tmp_path}" in text
    with pytest.raises(PrepError, match=r"shard 1/2: .*part-00000.bin"):  # the merge checks its shards too
        vggsound.run(["merge", f"out_root={tmp_path}"])
    redone = media.prep(vggsound, raw_root=raw["raw"], csv=raw["csv"], out_root=tmp_path, shard="1/2")
    assert 0 < redone["processed_now"] < redone["cached"]
    vggsound.run(["merge", f"out_root={tmp_path}"])
    assert len(VGGSound(root=str(tmp_path)).splits().test) == 3
    (tmp_path / "index.csv").write_text("id\n")  # the merged index: the merge alone rewrites it
    with pytest.raises(CacheDamagedError, match=f"Run `make prep-vggsound-merge OUT={tmp_path}` again"):
        VGGSound(root=str(tmp_path)).splits()


@pytest.mark.slow
def test_one_epoch_trains_on_the_prepared_cache(built, tmp_path):
    out, _ = built
    results = media.train_once("vggsound", out, tmp_path / "run", "modulation=ogm_ge", "modulation.alpha=0.1")
    assert results["status"] == "ok" and results["num_classes"] == 3
    assert np.isfinite(results["test"]["loss"])
