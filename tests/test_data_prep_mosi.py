"""CMU-MOSI: tiny pickles of both releases (MulT, MMSA; aligned and not) generated here -> cache -> reader."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from data_prep import mosi as prep
from data_prep.errors import PrepError
from onthefly.data.base import CacheDamagedError, CacheMissingError, EmptySplitError
from onthefly.data.cache import read_json
from onthefly.data.mosi import MOSI

from media import truncate

SIZES = {"train": 6, "valid": 3, "test": 4}
# scores per split: an exact 0 (positive), negatives, and one NaN in train (skipped)
SCORES = {"train": [1.5, -0.4, 0.0, np.nan, -3.0, 2.2], "valid": [0.6, -1.2, 0.0], "test": [-0.2, 3.0, 0.4, -2.6]}


def _sequences(rng, lengths, steps, dim, front=False, pad_value=0.0):
    """[N, steps, dim] of non-zero rows, padded with ``pad_value`` rows after (or before, ``front``) each length."""
    x = rng.uniform(0.5, 1.5, size=(len(lengths), steps, dim))
    for i, n in enumerate(lengths):
        if front:
            x[i, : steps - n] = pad_value
        else:
            x[i, n:] = pad_value
    return x


def _lengths(n, steps, seed):
    return list(np.random.default_rng(seed).integers(1, steps + 1, size=n))


def make_mult(aligned: bool, seed=0) -> tuple[dict, dict]:
    """A MulT-style pickle and the lengths it hides: aligned (T 8 everywhere, padded at the front, [N, 3] bytes
    ids) or unaligned (T 8 / 12 / 10, padded at the end, plain string ids)."""
    rng = np.random.default_rng(seed)
    steps = {"text": 8, "audio": 8, "vision": 8} if aligned else {"text": 8, "audio": 12, "vision": 10}
    dims = {"text": 300, "audio": 74, "vision": 35}
    data, hidden = {}, {}
    for k, (split, n) in enumerate(SIZES.items()):
        lengths = {m: _lengths(n, steps[m], seed * 10 + k + j) for j, m in enumerate(steps)}
        if aligned:
            lengths = {m: lengths["text"] for m in steps}
        d = {m: _sequences(rng, lengths[m], steps[m], dims[m], front=aligned) for m in steps}
        d["audio"][0, -1, 3] = -np.inf  # inside a valid step in both layouts (aligned pads at the front)
        d["vision"][0, -1, 0] = np.nan
        d["labels"] = np.array(SCORES[split], dtype=np.float32).reshape(n, 1, 1)
        if aligned:
            d["id"] = np.array([[f"vid{split}{i}".encode(), b"0.5", f"{i + 2}.0".encode()] for i in range(n)])
        else:
            d["id"] = np.array([f"vid_{split}_{i}" for i in range(n)])
        data[split] = d
        hidden[split] = lengths
    return data, hidden


def make_mmsa(aligned: bool, seed=1) -> tuple[dict, dict]:
    """An MMSA-style pickle: BERT-like text (12-d, non-zero where the mask is 0), text_bert; unaligned: given
    audio_lengths / vision_lengths shorter than the non-zero rows (so inference would disagree)."""
    rng = np.random.default_rng(seed)
    steps = {"text": 8, "audio": 8, "vision": 8} if aligned else {"text": 8, "audio": 14, "vision": 9}
    dims = {"text": 12, "audio": 5, "vision": 20}
    data, hidden = {}, {}
    for k, (split, n) in enumerate(SIZES.items()):
        lengths = {m: _lengths(n, steps[m], seed * 10 + k + j) for j, m in enumerate(steps)}
        d = {"text": rng.uniform(0.5, 1.5, size=(n, steps["text"], dims["text"]))}  # padding rows non-zero too
        mask = np.zeros((n, steps["text"]), dtype=np.int64)
        for i, length in enumerate(lengths["text"]):
            mask[i, :length] = 1
        d["text_bert"] = np.stack([mask * 101, mask, np.zeros_like(mask)], axis=1)
        for m in ("audio", "vision"):
            if aligned:
                d[m] = _sequences(rng, lengths[m], steps[m], dims[m])
            else:  # rows beyond the given length are non-zero: only the given length says where data ends
                d[m] = _sequences(rng, [steps[m]] * n, steps[m], dims[m])
                d[f"{m}_lengths"] = list(lengths[m])
        d["audio"][2, 0, 1] = -np.inf
        d["audio"][2, 0, 2] = np.inf
        d["vision"][1, 0, 4] = np.nan
        d["regression_labels"] = np.array(SCORES[split], dtype=np.float32)
        d["classification_labels"] = (np.nan_to_num(d["regression_labels"]) >= 0).astype(np.int64)
        d["id"] = np.array([f"{split}clip$_${i}" for i in range(n)], dtype=object)
        d["raw_text"] = np.array([f"words {i}" for i in range(n)], dtype=object)
        data[split] = d
        hidden[split] = lengths
    return data, hidden


def _dump(data, path):
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return path


def run(pkl, out, *extra):
    return prep.run([f"pkl={pkl}", f"out_root={out}", *extra])


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Every family prepared once: {name: (out, summary, data, hidden lengths)}."""
    root = tmp_path_factory.mktemp("mosi")
    made = {}
    for name, (data, hidden) in {
        "mult_aligned": make_mult(True),
        "mult_noalign": make_mult(False),
        "mmsa_aligned": make_mmsa(True),
        "mmsa_unaligned": make_mmsa(False),
    }.items():
        pkl = _dump(data, root / f"{name}.pkl")
        out = root / f"cache_{name}"
        made[name] = (out, run(pkl, out), data, hidden)
    return made


# --- prep ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, fmt, aligned, dims",
    [
        ("mult_aligned", "mult", True, {"text": 300, "audio": 74, "visual": 35}),
        ("mult_noalign", "mult", False, {"text": 300, "audio": 74, "visual": 35}),
        ("mmsa_aligned", "mmsa", True, {"text": 12, "audio": 5, "visual": 20}),
        ("mmsa_unaligned", "mmsa", False, {"text": 12, "audio": 5, "visual": 20}),
    ],
)
def test_release_is_detected_and_sizes_come_from_the_data(caches, name, fmt, aligned, dims):
    out, summary, data, _ = caches[name]
    recipe = read_json(out / "recipe.json")
    assert recipe["dataset"] == "mosi" and recipe["source_format"] == fmt and recipe["aligned"] is aligned
    assert recipe["dims"] == dims and summary["dims"] == dims
    assert recipe["max_len"] == {
        "text": data["train"]["text"].shape[1],
        "audio": data["train"]["audio"].shape[1],
        "visual": data["train"]["vision"].shape[1],
    }
    assert recipe["splits"] == {"train": 5, "val": 3, "test": 4}  # one NaN score left out of train
    assert recipe["split_names"]["val"] == "valid"
    assert recipe["source"]["size"] > 0 and recipe["code_version"]
    assert np.load(out / "train" / "visual.npy", mmap_mode="r").shape[1:] == (
        recipe["max_len"]["visual"],
        dims["visual"],
    )


def test_nonfinite_values_become_zero_and_are_counted(caches):
    out, summary, data, _ = caches["mult_noalign"]
    assert summary["replaced_nonfinite"]["audio"]["-inf"] == 3  # one per split
    assert summary["replaced_nonfinite"]["visual"]["nan"] == 3
    out, summary, _, _ = caches["mmsa_unaligned"]
    assert summary["replaced_nonfinite"]["audio"] == {"nan": 0, "+inf": 3, "-inf": 3}
    assert summary["replaced_nonfinite"]["visual"] == {"nan": 3, "+inf": 0, "-inf": 0}
    audio = np.load(out / "val" / "audio.npy")  # val row 2 (score 0.0, kept) held -inf and +inf at step 0
    assert audio[2, 0, 1] == 0.0 and audio[2, 0, 2] == 0.0 and audio[2, 0, 0] != 0.0
    for split in ("train", "val", "test"):
        for m in ("text", "audio", "visual"):
            assert np.isfinite(np.load(out / split / f"{m}.npy")).all()


def test_lengths_inferred_at_either_end_and_stored_left_aligned(caches):
    for name in ("mult_aligned", "mult_noalign"):
        out, summary, data, hidden = caches[name]
        index = pd.read_csv(out / "index.csv", keep_default_na=False)
        test = index[index["split"] == "test"].reset_index(drop=True)
        for m, key in (("text", "text"), ("audio", "audio"), ("visual", "vision")):
            assert list(test[f"len_{m}"]) == [int(v) for v in hidden["test"][key]], (name, m)
            stored = np.load(out / "test" / f"{m}.npy")
            lengths = np.load(out / "test" / f"{m}_lengths.npy")
            for i, n in enumerate(lengths):  # valid steps first, zeros after
                assert np.all(np.any(stored[i, :n] != 0, axis=1)) and not stored[i, n:].any()
        assert summary["lengths"]["audio"].startswith("inferred")
    _, summary, _, _ = caches["mult_aligned"]
    assert summary["moved_to_front"]["text"] > 0  # the aligned pickle is padded at the front
    out, _, data, _ = caches["mult_aligned"]
    i = 1  # test sample 1: its valid rows moved to the front, in their order
    n = int(np.load(out / "test" / "text_lengths.npy")[i])
    assert np.allclose(np.load(out / "test" / "text.npy")[i, :n], data["test"]["text"][i, -n:])


def test_given_lengths_are_used_and_the_padding_zeroed(caches):
    out, summary, data, hidden = caches["mmsa_unaligned"]
    assert summary["lengths"] == {
        "text": "given (text_bert attention mask)",
        "audio": "given (audio_lengths)",
        "visual": "given (vision_lengths)",
    }
    index = pd.read_csv(out / "index.csv", keep_default_na=False)
    val = index[index["split"] == "val"]
    for m, key in (("text", "text"), ("audio", "audio"), ("visual", "vision")):
        assert list(val[f"len_{m}"]) == [int(v) for v in hidden["valid"][key]]
    stored, lengths = np.load(out / "val" / "audio.npy"), np.load(out / "val" / "audio_lengths.npy")
    for i, n in enumerate(lengths):
        source = np.nan_to_num(data["valid"]["audio"][i, :n], nan=0.0, posinf=0.0, neginf=0.0)
        assert not stored[i, n:].any() and np.allclose(stored[i, :n], source)
    _, summary, _, _ = caches["mmsa_aligned"]  # no *_lengths: inferred, but the text from its mask
    assert summary["lengths"]["text"].startswith("given") and summary["lengths"]["audio"].startswith("inferred")


def test_scores_labels_ids_and_the_skipped_nan_label(caches):
    out, summary, _, _ = caches["mult_aligned"]
    index = pd.read_csv(out / "index.csv", keep_default_na=False)
    assert len(index) == 13 and summary["counts"]["train"] == {"listed": 6, "cached": 5, "skipped": 1}
    bad = index[index["status"] != "ok"]
    assert len(bad) == 1 and bad.iloc[0]["status"] == "bad_label" and "nan" in bad.iloc[0]["reason"]
    assert bad.iloc[0]["split"] == "train" and bad.iloc[0]["row"] == -1 and bad.iloc[0]["source_row"] == 3
    ok = index[index["status"] == "ok"]
    assert list(ok["label"]) == [int(s >= 0) for s in ok["score"].astype(float)]
    assert ok[ok["score"].astype(float) == 0.0]["label"].tolist() == [1, 1]  # 0 counts as positive
    assert np.allclose(np.load(out / "train" / "score.npy"), [1.5, -0.4, 0.0, -3.0, 2.2])
    assert index.iloc[0]["id"] == "vidtrain0_0.5_2.0"  # [video, start, end] bytes joined
    out, _, _, _ = caches["mmsa_unaligned"]
    assert pd.read_csv(out / "index.csv")["id"].iloc[0] == "trainclip$_$0"


def test_summary_is_printed(tmp_path, capsys):
    data, _ = make_mmsa(False)
    run(_dump(data, tmp_path / "u.pkl"), tmp_path / "out")
    text = capsys.readouterr().out
    assert "MMSA pickle, unaligned" in text and "text 12, audio 5, visual 20" in text
    assert "train" in text and "+inf 3" in text and "index" in text and "only files you trust" in text


def test_rerun_is_a_no_op_and_another_source_needs_overwrite(tmp_path, capsys):
    data, _ = make_mult(True)
    pkl, out = _dump(data, tmp_path / "a.pkl"), tmp_path / "out"
    run(pkl, out)
    stamp = (out / "train" / "text.npy").stat().st_mtime_ns
    again = run(pkl, out)
    assert again["up_to_date"] and "nothing to do" in capsys.readouterr().out
    assert (out / "train" / "text.npy").stat().st_mtime_ns == stamp
    other = _dump(make_mult(False)[0], tmp_path / "b.pkl")
    with pytest.raises(PrepError, match="overwrite=true"):
        run(other, out)
    assert read_json(out / "recipe.json")["aligned"] is True  # untouched
    run(other, out, "overwrite=true")
    assert read_json(out / "recipe.json")["aligned"] is False


@pytest.mark.parametrize(
    "break_it, words",
    [
        (lambda d: d.pop("valid"), ["'valid'", "MulT", "MMSA"]),
        (lambda d: d["test"].pop("vision"), ["'vision'", "'test'", "regression_labels"]),
        (lambda d: d["train"].pop("regression_labels"), ["'labels'", "'regression_labels'", "'train'"]),
        (lambda d: d["valid"].update(audio=d["valid"]["audio"][:2]), ["'valid'", "disagree", "'audio': 2"]),
        (lambda d: d["train"].update(text=d["train"]["text"][:, :, 0]), ["'text'", "shape"]),
    ],
)
def test_bad_pickles_exit_with_a_message_naming_the_problem(tmp_path, break_it, words):
    data, _ = make_mmsa(True)
    break_it(data)
    with pytest.raises(PrepError) as err:
        run(_dump(data, tmp_path / "bad.pkl"), tmp_path / "out")
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert not (tmp_path / "out" / "recipe.json").exists()


def test_arguments_and_unreadable_files(tmp_path):
    with pytest.raises(PrepError, match="pkl= is required"):
        prep.run([f"out_root={tmp_path}"])
    with pytest.raises(PrepError, match="no such file"):
        prep.run([f"pkl={tmp_path / 'absent.pkl'}"])
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(PrepError, match="could not be unpickled"):
        prep.run([f"pkl={tmp_path / 'junk.pkl'}", f"out_root={tmp_path / 'o'}"])
    _dump([1, 2], tmp_path / "list.pkl")
    with pytest.raises(PrepError, match="not a dict of splits"):
        prep.run([f"pkl={tmp_path / 'list.pkl'}", f"out_root={tmp_path / 'o'}"])


def test_python2_byte_strings_are_read_as_latin1(tmp_path):
    path = tmp_path / "py2.pkl"
    path.write_bytes(b"\x80\x02U\x03\xe9ab.")  # protocol 2, SHORT_BINSTRING of non-ASCII bytes (a Python 2 str)
    assert prep.load_pickle(path) == "\xe9ab"


def test_default_out_is_under_onthefly_data(tmp_path, monkeypatch):
    monkeypatch.setenv("ONTHEFLY_DATA", str(tmp_path / "data"))
    prep.run([f"pkl={_dump(make_mmsa(True)[0], tmp_path / 'a.pkl')}"])
    assert (tmp_path / "data" / "mosi" / "recipe.json").exists()


# --- reader -------------------------------------------------------------------------------------------------
def test_reader_items_and_declarations(caches):
    out, _, data, _ = caches["mult_noalign"]
    splits = MOSI(root=str(out)).splits()
    assert (len(splits.train), len(splits.val), len(splits.test)) == (5, 3, 4)
    assert splits.num_classes == 2 and splits.class_names == ["negative", "positive"]
    assert splits.modalities == ["text", "audio", "visual"] and splits.targets == ["score"]
    assert splits.encoder_args == {"text": {"in_dim": 300}, "audio": {"in_dim": 74}, "visual": {"in_dim": 35}}
    assert splits.train_eval is None and splits.probe_train is splits.train
    item = splits.test[1]
    assert set(item) == {"text", "audio", "visual", "label", "score", "index"}
    for m, shape in (("text", (8, 300)), ("audio", (12, 74)), ("visual", (10, 35))):
        assert item[m]["x"].shape == shape and item[m]["x"].dtype == torch.float32
        assert item[m]["length"].dtype == torch.int64 and item[m]["length"].ndim == 0
        assert 1 <= int(item[m]["length"]) <= shape[0]
    assert item["score"].dtype == torch.float32 and float(item["score"]) == pytest.approx(3.0)
    assert item["label"] == 1 and item["index"] == 1
    assert splits.val[2]["label"] == 1 and float(splits.val[2]["score"]) == 0.0


def test_reader_batches_with_the_default_collate(caches):
    out, _, _, _ = caches["mmsa_unaligned"]
    splits = MOSI(root=str(out), modalities=["audio", "text"]).splits()
    batch = next(iter(DataLoader(splits.train, batch_size=4, shuffle=False)))
    assert "_arrays" in vars(splits.train) and pickle.loads(pickle.dumps(splits.train))._arrays == {}  # workers
    assert set(batch) == {"audio", "text", "label", "score", "index"}
    assert batch["audio"]["x"].shape == (4, 14, 5) and batch["audio"]["length"].shape == (4,)
    assert batch["text"]["x"].shape == (4, 8, 12) and batch["score"].shape == (4,)
    assert batch["label"].tolist() == [1, 0, 1, 0] and splits.encoder_args == {
        "audio": {"in_dim": 5},
        "text": {"in_dim": 12},
    }


def test_reader_max_len_and_normalise(caches):
    out, _, _, _ = caches["mult_noalign"]
    cut = MOSI(root=str(out), max_len=5).splits()
    for i in range(len(cut.train)):
        item = cut.train[i]
        assert item["audio"]["x"].shape == (5, 74) and 1 <= int(item["audio"]["length"]) <= 5
    norm = MOSI(root=str(out), normalise=True).splits()
    xs = [norm.train[i]["visual"] for i in range(len(norm.train))]
    valid = torch.cat([v["x"][: int(v["length"])] for v in xs])
    assert valid.mean(0).abs().max() < 1e-4 and (valid.std(0, unbiased=False) - 1).abs().max() < 1e-3
    assert all(not v["x"][int(v["length"]) :].any() for v in xs)  # padding stays zero
    assert norm.test[0]["visual"]["x"].dtype == torch.float32


def test_reader_refuses_unknown_modalities_and_a_missing_cache(tmp_path):
    with pytest.raises(ValueError, match="text.*audio.*visual"):
        MOSI(root=str(tmp_path), modalities=["audio", "flow"])
    with pytest.raises(CacheMissingError, match="make prep-mosi PKL="):
        MOSI(root=str(tmp_path / "nothing")).splits()


# --- damage -------------------------------------------------------------------------------------------------------
@pytest.fixture
def mosi_cache(caches, tmp_path):
    out, _, data, _ = caches["mult_noalign"]
    pkl = _dump(data, tmp_path / "m.pkl")
    cache = tmp_path / "cache"
    run(pkl, cache)
    return pkl, cache


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda c: truncate(c / "train" / "audio.npy"), ["train/audio.npy (train audio features)", "cut"]),
        (lambda c: (c / "val" / "score.npy").unlink(), ["val/score.npy (val scores) is missing"]),
        (lambda c: (c / "recipe.json").write_text("{"), ["recipe.json is damaged"]),
        (
            lambda c: pd.read_csv(c / "index.csv").iloc[:-1].to_csv(c / "index.csv", index=False),
            ["index.csv has 12 segments", "deleted or edited"],
        ),
    ],
)
def test_a_damaged_cache_is_named_at_open_and_the_same_prep_command_rebuilds_it(mosi_cache, damage, words, capsys):
    pkl, cache = mosi_cache
    damage(cache)
    with pytest.raises(CacheDamagedError) as err:
        MOSI(root=str(cache)).splits()
    for word in [*words, "make prep-mosi PKL="]:
        assert word in str(err.value), (word, str(err.value))
    if "recipe" in words[0]:  # which file the cache came from is unknown: only overwrite=true rebuilds it
        with pytest.raises(PrepError, match="overwrite=true"):
            run(pkl, cache)
        run(pkl, cache, "overwrite=true")
    else:
        run(pkl, cache)
        assert "damaged; rebuilding it" in capsys.readouterr().out
    assert len(MOSI(root=str(cache)).splits().test) == 4


def test_verify_cache_finds_non_finite_features(mosi_cache, capsys):
    from data_prep import verify

    _, cache = mosi_cache
    assert verify.main(["dataset=mosi", f"root={cache}", "progress=false"]) == 0
    arr = np.load(cache / "test" / "visual.npy", mmap_mode="r+")
    arr[1, 0, 0] = np.inf
    arr.flush()
    del arr
    assert verify.main(["dataset=mosi", f"root={cache}", "progress=false"]) == 1
    out, err = capsys.readouterr()
    assert "test/visual: 1 non-finite feature values" in out and "ARGS=overwrite=true" in err


def test_an_empty_split_is_named(mosi_cache):
    _, cache = mosi_cache
    for name in ("text", "audio", "visual"):
        for kind in ("", "_lengths"):
            arr = np.load(cache / "val" / f"{name}{kind}.npy")
            np.save(cache / "val" / f"{name}{kind}.npy", arr[:0])
    np.save(cache / "val" / "score.npy", np.load(cache / "val" / "score.npy")[:0])
    recipe = read_json(cache / "recipe.json")
    recipe["splits"]["val"] = 0
    recipe["counts"]["val"] = {"listed": 0, "cached": 0, "skipped": 0}
    (cache / "recipe.json").write_text(json.dumps(recipe))
    index = pd.read_csv(cache / "index.csv")
    index[index["split"] != "val"].to_csv(cache / "index.csv", index=False)
    with pytest.raises(EmptySplitError, match="the val split is empty: the mosi cache at .* no usable segment"):
        MOSI(root=str(cache)).splits()
