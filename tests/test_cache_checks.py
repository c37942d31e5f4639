"""Damaged caches are found when they are opened (no decoding), or by `make verify-cache` (decoding), with the file,
the clips and the fix named; running the prep again repairs them. Also: splits that end up empty."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate
from test_data_prep_cremad import built, raw  # noqa: F401  (the generated raw tree and its cache, as fixtures)

from data_prep import cremad, verify
from data_prep.cache import CacheConflict
from onthefly.config import compose
from onthefly.data.base import CacheDamagedError, EmptySplitError
from onthefly.data.cache import CacheReader, read_index
from onthefly.data.cremad import CremaD

import media

FIX = "make prep-cremad RAW="


@pytest.fixture
def cache(built, tmp_path):
    """A fresh copy of the built cache, to damage."""
    return shutil.copytree(built[0], tmp_path / "cache")


def reprep(raw, cache) -> dict:
    return media.prep(cremad, raw_root=raw["raw"], out_root=cache, splits=raw["lists"])


def ok_ids(cache) -> list[str]:
    return sorted(CacheReader(cache, "cremad").ok_rows()["id"])


def test_an_intact_cache_opens_and_verifies(built):
    assert len(CremaD(root=str(built[0])).splits().test) == 6
    assert verify.run(["dataset=cremad", f"root={built[0]}", "progress=false"]) == {"bad": {}}


def test_cut_array_part_names_the_file_its_clips_and_the_fix_and_a_rerun_repairs_it(raw, cache):
    before = ok_ids(cache)
    media.truncate(cache / "arrays" / "part-00000.npy", 0.6)
    with pytest.raises(CacheDamagedError) as err:
        CremaD(root=str(cache)).splits()
    text = str(err.value)
    assert "arrays/part-00000.npy" in text and "cut" in text and "Clips affected: 12" in text
    assert sum(i in text for i in before) == 5 and "and 7 more" in text and FIX in text and "again" in text
    summary = reprep(raw, cache)
    assert summary["processed_now"] == 12 and summary["cached"] == 12  # every clip of the unusable part, no other
    assert ok_ids(cache) == before and len(CremaD(root=str(cache)).splits().test) == 6


def test_cut_frames_part_names_the_clips_past_the_cut_and_a_rerun_redoes_only_them(raw, cache):
    reader = CacheReader(cache, "cremad")
    ends = {
        row.id: int(reader.frame_table()[row.frame_start + row.n_frames - 1, 1:].sum())
        for row in reader.ok_rows().itertuples()
    }
    cut = sorted(ends.values())[5]  # the first five clips' frames stay whole
    data = (cache / "frames" / "part-00000.bin").read_bytes()
    (cache / "frames" / "part-00000.bin").write_bytes(data[: cut - 1])
    lost = sorted(i for i, end in ends.items() if end > cut - 1)
    with pytest.raises(CacheDamagedError) as err:
        CacheReader(cache, "cremad")
    text = str(err.value)
    assert "frames/part-00000.bin" in text and f"Clips affected: {len(lost)} " in text and lost[0] in text
    assert FIX in text
    assert reprep(raw, cache)["processed_now"] == len(lost)
    assert ok_ids(cache) == sorted(ends) and len(CremaD(root=str(cache), image_size=32).splits().train[0]) > 0


def test_a_deleted_storage_file_is_named(cache):
    (cache / "frames" / "part-00000.bin").unlink()
    with pytest.raises(CacheDamagedError, match=r"part-00000.bin \(JPEG frames\) is missing(.|\n)*Clips affected: 12"):
        CacheReader(cache, "cremad")


def test_invalid_recipe_json_names_the_file_and_the_rebuild(raw, cache):
    (cache / "recipe.json").write_text('{"format": 1, "dataset": "cremad", ')
    with pytest.raises(CacheDamagedError, match=r"recipe.json is damaged(.|\n)*make prep-cremad .*ARGS=overwrite=true"):
        CremaD(root=str(cache)).splits()
    with pytest.raises(CacheConflict, match=r"recipe.json is damaged(.|\n)*overwrite=true"):
        reprep(raw, cache)  # the writer cannot tell what the cache holds: it does not guess
    media.prep(cremad, raw_root=raw["raw"], out_root=cache, splits=raw["lists"], overwrite="true")
    assert len(CremaD(root=str(cache)).splits().test) == 6


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda c: (c / "layout.json").write_text("[1, 2"), ["layout.json is damaged"]),
        (lambda c: media.truncate(c / "frames" / "table.npy", 0.5), ["frames/table.npy", "cut"]),
        (lambda c: (c / "index.csv").write_bytes(b"id,label\n\xff\xfe,\x00"), ["index.csv"]),
    ],
)
def test_damaged_layout_table_or_index_is_named_and_a_rerun_rewrites_it(raw, cache, damage, words):
    damage(cache)
    with pytest.raises(CacheDamagedError) as err:
        CremaD(root=str(cache)).splits()
    for word in [*words, FIX, "journal"]:
        assert word in str(err.value), (word, str(err.value))
    assert reprep(raw, cache)["processed_now"] == 0  # rewritten from the journal: nothing decoded
    assert len(CremaD(root=str(cache)).splits().test) == 6


def test_rows_deleted_from_the_index_are_found_and_a_rerun_restores_them(raw, cache):
    index = read_index(cache / "index.csv")
    gone = index[index["status"] == "ok"].iloc[2]
    index.drop(index=gone.name).to_csv(cache / "index.csv", index=False)
    with pytest.raises(CacheDamagedError) as err:
        CremaD(root=str(cache)).splits()
    text = str(err.value)
    assert f"5 usable {gone.split} clips where the prep cached 6" in text and "deleted or edited" in text
    assert "index.csv" in text and FIX in text
    assert reprep(raw, cache)["processed_now"] == 0
    assert gone.id in set(read_index(cache / "index.csv")["id"])
    CremaD(root=str(cache)).splits()


def test_an_edited_status_is_found_too(cache):
    index = read_index(cache / "index.csv")
    index.loc[index["status"] == "ok", "status"] = ["ok"] * 11 + ["excluded"]
    index.to_csv(cache / "index.csv", index=False)
    with pytest.raises(CacheDamagedError, match="where the prep cached"):
        CacheReader(cache, "cremad")


def _garble(cache, clip_id: str, header: bool) -> None:
    """Overwrite bytes of the clip's first JPEG in place (the file keeps its size)."""
    reader = CacheReader(cache, "cremad")
    row = reader.ok_rows().set_index("id").loc[clip_id]
    part, offset, length = (int(v) for v in reader.frame_table()[row.frame_start])
    path = cache / reader.layout["frames"]["parts"][part]
    data = bytearray(path.read_bytes())
    start = offset if header else offset + length // 2
    data[start : start + 16] = bytes(range(7, 23))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("header", [True, False], ids=["jpeg-header", "entropy-data"])
def test_garbled_jpeg_bytes_open_but_verify_cache_names_the_clip_and_mark_then_prep_repairs_it(
    raw, cache, header, capsys
):
    victim = ok_ids(cache)[3]
    _garble(cache, victim, header)
    CremaD(root=str(cache))  # sizes are intact: the open-time check cannot see it
    CacheReader(cache, "cremad")
    args = ["dataset=cremad", f"root={cache}", "progress=false"]
    assert verify.main(args) == 1
    out, err = capsys.readouterr()
    assert "1 bad" in out and victim in out and "frame 0 (visual) in frames/part-00000.bin" in out
    assert "ARGS=mark=true" in err and FIX in err
    assert verify.main([*args, "mark=true"]) == 1
    assert "Marked 1 clips as damaged" in capsys.readouterr().err
    assert reprep(raw, cache)["processed_now"] == 1  # exactly the marked clip
    assert verify.run(args) == {"bad": {}}


def test_verify_cache_finds_non_finite_and_changed_spectrograms(cache, capsys):
    reader = CacheReader(cache, "cremad")
    row = reader.ok_rows().iloc[0]
    arr = np.load(cache / "arrays" / "part-00000.npy", mmap_mode="r+")
    arr[row.array_row, 0, 0] = np.nan
    arr[row.array_row + 1, 5, 5] += 1.0
    arr.flush()
    del arr
    assert verify.main(["dataset=cremad", f"root={cache}", "progress=false"]) == 1
    out = capsys.readouterr().out
    assert "2 bad" in out and "1 non-finite values in its spectrogram" in out and "changed since the prep" in out


def test_verify_cache_reports_what_the_open_check_finds(cache, capsys):
    media.truncate(cache / "arrays" / "part-00000.npy", 0.9)
    assert verify.main(["dataset=cremad", f"root={cache}", "progress=false"]) == 1
    assert "arrays/part-00000.npy" in capsys.readouterr().err


def test_a_split_emptied_by_val_fraction_names_the_split_and_the_setting(built):
    out, _ = built
    with pytest.raises(EmptySplitError) as err:
        CremaD(root=str(out), val_fraction=0.99).splits()
    text = str(err.value)
    assert text.startswith("the train split is empty: dataset.val_fraction=0.99 moved all 6 training clips of")
    assert str(out) in text and "into val; use a value of 0.5 or less" in text
    advised = CremaD(root=str(out), val_fraction=0.5).splits()
    assert len(advised.train) and len(advised.val) and len(advised.train) + len(advised.val) == 6


def test_a_cache_without_usable_clips_in_a_split_names_it(cache):
    index = read_index(cache / "index.csv")
    index.loc[index["split"] == "test", "split"] = "train"  # a cache whose test split is empty
    index.to_csv(cache / "index.csv", index=False)
    recipe = json.loads((cache / "recipe.json").read_text())
    recipe["index"]["ok"] = {"train": 12, "val": 0, "test": 0}
    (cache / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(EmptySplitError, match=r"the test split is empty: the cache at .* no usable clip in split"):
        CremaD(root=str(cache)).splits()


@pytest.mark.parametrize("key", ["num_train", "num_val", "num_test"])
def test_synthetic_split_sizes_of_zero_are_refused(key):
    cfg = compose(["dataset=synth_av", f"dataset.{key}=0"])
    with pytest.raises(EmptySplitError, match=rf"the {key[4:]} split is empty: dataset.{key}=0; use at least 1"):
        instantiate(cfg.dataset).splits()


def test_old_caches_without_the_index_record_are_checked_against_their_summary(cache):
    recipe = json.loads((cache / "recipe.json").read_text())
    del recipe["index"]
    (cache / "recipe.json").write_text(json.dumps(recipe))
    CacheReader(cache, "cremad")
    index = pd.read_csv(cache / "index.csv")
    index.iloc[1:].to_csv(cache / "index.csv", index=False)
    with pytest.raises(CacheDamagedError, match="index.csv has"):
        CacheReader(cache, "cremad")
