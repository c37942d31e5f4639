"""AVQA and MUSIC-AVQA end to end on generated annotations and clips: statuses, vocabulary, token tables, the
reader's items, an external VGGSound cache as the media source, and the errors that name the fix."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_prep import avqa, vggsound
from data_prep.errors import PrepError
from onthefly.data.avqa import AVQA, read_questions
from onthefly.data.base import CacheDamagedError, CacheMissingError, EmptySplitError

import media

SECONDS = 2.0


def _clip(i: int) -> tuple[str, int]:
    return media.ytid(i), 7 * i + 1


def _video(root, i: int, padded: bool, **kwargs) -> None:
    yt, start = _clip(i)
    name = f"{yt}_{start:06d}" if padded else f"{yt}_{start}"
    media.write_video(root / f"{name}.mp4", SECONDS, shift=i, audio_rate=16000, audio_freq=media.SINE_HZ, **kwargs)


def _name(i: int, padded: bool = True) -> str:
    yt, start = _clip(i)
    return f"{yt}_{start:06d}" if padded else f"{yt}_{start}"


def _item(qid: int, video: str, text: str, qtype: str, relation: str, answer: int = 0, choices=None) -> dict:
    return {
        "id": qid,
        "video_name": video,
        "question_text": text,
        "question_type": qtype,
        "question_relation": relation,
        "answer": answer,
        "multi_choice": choices or ["a barking dog", "a piano", "nothing at all", "the wind"],
    }


def _write(path, items) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(items))


# --- AVQA (Yang et al.) from raw clips ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def yang(tmp_path_factory):
    root = tmp_path_factory.mktemp("avqa_raw")
    videos = root / "videos" / "sub"
    # clips 0-5 exist (0, 2, 4 with unpadded file names); clip 6 has no file
    for i in range(6):
        _video(videos, i, padded=i % 2 == 1)
    train = [
        _item(1, _name(0), "What is the dog doing?", "Which", "Audio", 0),
        _item(2, _name(0, padded=False), "Where does the sound of the dog come from?", "Come From", "Both", 1),
        _item(3, _name(1, padded=False), "What does the man in the video play?", "Which", "Visual", 2),
        _item(4, _name(2), "Is the dog barking loudly in the video?", "Happening", "Audio", 3),
        _item(5, _name(3), "What is the man doing?", "Come From", "Visual", 1),
        _item(6, _name(6), "What is the dog doing?", "Which", "Both", 0),  # no video file
        _item(7, _name(1), "?? !!", "Which", "Audio", 0),  # no word
        {
            "id": 8,
            "video_name": _name(2),
            "question_text": "Broken?",
            "multi_choice": ["x", "y"],
            "answer": 0,
            "question_type": "Which",
            "question_relation": "Audio",
        },  # 2 choices, not 4
        _item(9, _name(3), "What's the man's dog doing?", "Which", "Both", 2, ["", "a", "b", "c d e f g h i j k"]),
    ]
    test = [
        _item(10, _name(4), "Is the zebra barking?", "Happening", "Audio", 1),  # "zebra": a test-only word
        _item(11, _name(5, padded=False), "What is the man doing?", "Which", "Visual", 2),
    ]
    _write(root / "ann" / "train_qa.json", train)
    _write(root / "ann" / "val_qa.json", test)
    out = root / "cache"
    summary = media.prep(avqa, ann=root / "ann", media=root / "videos", out_root=out)
    return {"root": root, "out": out, "summary": summary}


def test_index_records_every_question_with_its_status_and_reason(yang):
    index = read_questions(yang["out"] / "index.csv").set_index("id")
    status = index["status"].to_dict()
    assert status == {
        "1": "ok",
        "2": "ok",
        "3": "ok",
        "4": "ok",
        "5": "ok",
        "6": "missing_media",
        "7": "empty_question",
        "8": "bad_item",
        "9": "ok",
        "10": "ok",
        "11": "ok",
    }
    assert "no video file" in index.loc["6", "reason"] and _name(6) in index.loc["6", "reason"]
    assert "multi_choice has 2" in index.loc["8", "reason"]
    assert index.loc["2", "video"] == _name(0) and index.loc["3", "video"] == _name(1)  # unpadded names resolved
    assert list(index["split"]) == ["train"] * 9 + ["test"] * 2
    assert index.loc["3", ["label", "qtype", "relation"]].tolist() == [2, "Which", "Visual"]
    s = yang["summary"]
    assert s["skipped"] == {"missing_media": 1, "empty_question": 1, "bad_item": 1}
    assert s["per_split"] == {"train": {"listed": 9, "usable": 6}, "test": {"listed": 2, "usable": 2}}
    assert s["media"]["cached"] == 6 and s["media"]["skipped"] == {"missing": 1}
    recipe = json.loads((yang["out"] / "recipe.json").read_text())
    assert recipe["dataset"] == "avqa" and recipe["annotations"]["format"] == "yang"
    assert recipe["question_types"] == ["Come From", "Happening", "Which"]
    assert recipe["relations"] == ["Audio", "Both", "Visual"]
    assert recipe["media_cache"]["path"] == str((yang["out"] / "media").resolve())
    assert recipe["media_cache"]["relative"] == "media" and recipe["media_cache"]["audio"] == "ogm_ge"


def test_vocabulary_comes_from_train_questions_and_choices(yang):
    vocab = json.loads((yang["out"] / "vocab.json").read_text())["tokens"]
    assert vocab[:2] == ["<pad>", "<unk>"]
    counts = json.loads((yang["out"] / "vocab.json").read_text())["train_counts"]
    assert counts[2:] == sorted(counts[2:], reverse=True)  # by count, then alphabetical
    assert vocab.index("the") == 2 and "what's" in vocab and "man's" in vocab  # inner apostrophes kept
    assert "zebra" not in vocab and "broken" not in vocab  # a test-only word; a malformed item's word
    assert {"dog", "piano", "wind", "j"} <= set(vocab)  # choices count as train text
    index = read_questions(yang["out"] / "index.csv")
    with np.load(yang["out"] / "tokens.npz") as npz:
        tokens = {k: npz[k] for k in npz.files}
    row = int(np.flatnonzero(index["id"] == "10")[0])  # "Is the zebra barking?"
    assert tokens["question"][row, :4].tolist() == [vocab.index("is"), vocab.index("the"), 1, vocab.index("barking")]
    assert tokens["question_length"][row] == 4 and tokens["question"][row, 4:].sum() == 0


def test_token_tables_are_padded_to_the_longest_train_text(yang):
    with np.load(yang["out"] / "tokens.npz") as npz:
        tokens = {k: npz[k] for k in npz.files}
    n = 11
    assert tokens["question"].shape == (n, 9)  # "Where does the sound of the dog come from?"
    assert tokens["choices"].shape == (n, 4, 8) and tokens["choice_length"].shape == (n, 4)  # capped at 8
    row = 8  # id 9: choices "", "a", "b", "c d e f g h i j k" (9 words)
    assert tokens["choice_length"][row].tolist() == [1, 1, 1, 8]
    assert tokens["choices"][row, 0].tolist() == [1] + [0] * 7  # an empty choice: one <unk>
    assert yang["summary"]["truncated"] == {"questions": 0, "choices": 1} and yang["summary"]["empty_choices"] == 1


def test_reader_items_splits_and_batches(yang):
    splits = AVQA(root=str(yang["out"]), image_size=32).splits()
    assert splits.num_classes == 4 and splits.class_names == ["choice 0", "choice 1", "choice 2", "choice 3"]
    vocab = json.loads((yang["out"] / "vocab.json").read_text())["tokens"]
    assert splits.encoder_args == {"question": {"vocab_size": len(vocab)}}
    assert splits.context == ["question"] and splits.targets == ["qtype", "relation"]
    assert splits.target_names == {
        "qtype": ["Come From", "Happening", "Which"],
        "relation": ["Audio", "Both", "Visual"],
    }
    # val: whole train videos held out (clips 0-3 carry the 6 usable train questions)
    train_videos, val_videos = set(splits.train.rows["video"]), set(splits.val.rows["video"])
    assert len(val_videos) == 1 and not train_videos & val_videos
    assert len(splits.train) + len(splits.val) == 6 and len(splits.test) == 2
    assert len(splits.train_eval) == len(splits.train)
    item = splits.test[0]
    assert item["audio"].shape == (1, 129, 626) and item["audio"].dtype == torch.float32
    assert item["visual"].shape == (3, 3, 32, 32) and item["visual"].dtype == torch.float32
    q = item["question"]
    assert q["tokens"].shape == (9,) and q["tokens"].dtype == torch.int64
    assert q["length"].dtype == torch.int64 and q["length"].ndim == 0 and int(q["length"]) == 4
    assert q["choices"].shape == (4, 8) and q["choice_lengths"].shape == (4,) and q["choices"].dtype == torch.int64
    assert (item["label"], item["qtype"], item["relation"], item["index"]) == (1, 1, 0, 0)
    batch = next(iter(DataLoader(splits.train, batch_size=3, shuffle=False)))
    assert batch["audio"].shape == (3, 1, 129, 626) and batch["visual"].shape == (3, 3, 3, 32, 32)
    assert batch["question"]["tokens"].shape == (3, 9) and batch["question"]["length"].shape == (3,)
    assert batch["question"]["choices"].shape == (3, 4, 8) and batch["label"].dtype == torch.int64
    assert batch["qtype"].shape == batch["relation"].shape == (3,)
    audio_only = AVQA(root=str(yang["out"]), modalities=["audio"]).splits().test[0]
    assert "visual" not in audio_only and audio_only["audio"].shape == (1, 129, 626)


def test_rerun_reuses_the_media_and_rewrites_the_tables(yang, tmp_path):
    root = yang["root"]
    out = tmp_path / "cache"
    shutil.copytree(yang["out"], out)  # the whole folder moved: its own media cache moves with it
    assert len(AVQA(root=str(out), image_size=32).splits().test) == 2
    summary = media.prep(avqa, ann=root / "ann", media=root / "videos", out_root=out, max_question_len=3)
    assert summary["media"]["processed_now"] == 0 and summary["media"]["reused"] == 6
    assert summary["truncated"]["questions"] == 9 and summary["max_question_len"] == 3
    splits = AVQA(root=str(out), image_size=32).splits()
    assert splits.test[0]["question"]["tokens"].shape == (3,) and int(splits.test[0]["question"]["length"]) == 3


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda c: media.truncate(c / "tokens.npz", 0.5), ["tokens.npz is damaged"]),
        (lambda c: (c / "vocab.json").write_text('{"tokens": ["<pad>"'), ["vocab.json is damaged"]),
        (
            lambda c: read_questions(c / "index.csv").iloc[1:].to_csv(c / "index.csv", index=False),
            ["index.csv has 10 questions", "deleted or edited"],
        ),
        (lambda c: (c / "recipe.json").write_text("[]"), ["recipe.json is damaged", "ARGS=overwrite=true"]),
        (
            lambda c: media.truncate(c / "media" / "arrays" / "part-00000.npy", 0.5),
            ["media/arrays/part-00000.npy (spectrograms)", "Clips affected: 5 ("],
        ),
    ],
)
def test_damaged_question_tables_or_media_are_named_and_the_prep_repairs_them(yang, tmp_path, damage, words):
    out = tmp_path / "cache"
    shutil.copytree(yang["out"], out)
    damage(out)
    with pytest.raises(CacheDamagedError) as err:
        AVQA(root=str(out)).splits()
    for word in [*words, "make prep-avqa ANN="]:
        assert word in str(err.value), (word, str(err.value))
    overwrite = {"overwrite": "true"} if "recipe" in words[0] else {}
    summary = media.prep(avqa, ann=yang["root"] / "ann", media=yang["root"] / "videos", out_root=out, **overwrite)
    assert summary["media"]["processed_now"] == (5 if "media" in words[0] else 0)
    assert len(AVQA(root=str(out)).splits().test) == 2


def test_verify_cache_checks_the_tables_and_the_media(yang, tmp_path, capsys):
    from data_prep import verify

    assert verify.main(["dataset=avqa", f"root={yang['out']}", "progress=false"]) == 0
    out = tmp_path / "cache"
    shutil.copytree(yang["out"], out)
    arr = np.load(out / "media" / "arrays" / "part-00000.npy", mmap_mode="r+")
    arr[2, 0, 0] = np.nan
    arr.flush()
    del arr
    assert verify.main(["dataset=avqa", f"root={out}", "progress=false", "mark=true"]) == 1
    text = capsys.readouterr()
    assert "non-finite values in its spectrogram" in text.out and "make prep-avqa ANN=" in text.err
    summary = media.prep(avqa, ann=yang["root"] / "ann", media=yang["root"] / "videos", out_root=out)
    assert summary["media"]["processed_now"] == 1
    assert verify.main(["dataset=avqa", f"root={out}", "progress=false"]) == 0


def test_a_val_fraction_that_empties_train_names_it(yang):
    with pytest.raises(
        EmptySplitError,
        match=r"the train split is empty: dataset.val_fraction=0.9 moved all 6 "
        r"training questions of .* into val; use a value of 0.5 or less",
    ):
        AVQA(root=str(yang["out"]), val_fraction=0.9).splits()


# --- an existing VGGSound cache as the media ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vgg_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("avqa_vgg_raw")
    rows = []
    for i in range(3):
        _video(root / "video", i, padded=i != 1)
        rows.append((_clip(i)[0], _clip(i)[1], "dog barking", "train" if i else "test"))
    media.write_video(root / "video" / f"{_name(3)}.mp4", SECONDS, audio_freq=None)  # no audio track
    rows.append((_clip(3)[0], _clip(3)[1], "playing piano", "train"))
    csv = media.write_csv(root / "vggsound.csv", rows)
    out = tmp_path_factory.mktemp("avqa_vgg_cache")
    media.prep(vggsound, raw_root=root, csv=csv, out_root=out)
    return out


def test_questions_read_their_clips_from_a_vggsound_cache(vgg_cache, tmp_path):
    ann = tmp_path / "ann"
    _write(
        ann / "train_qa.json",
        [
            _item(1, _name(1, padded=False), "What is the dog doing?", "Which", "Audio", 0),
            _item(2, _name(2), "Is the dog loud?", "Happening", "Both", 1),
            _item(3, _name(3), "What is played?", "Which", "Visual", 2),  # no_audio in the VGGSound cache
            _item(4, _name(9), "What is played?", "Which", "Visual", 2),  # not in it at all
        ],
    )
    _write(ann / "val_qa.json", [_item(5, _name(0), "Is the dog loud?", "Happening", "Audio", 3)])
    moved = tmp_path / "vgg"
    shutil.copytree(vgg_cache, moved)
    out = tmp_path / "avqa"
    summary = media.prep(avqa, ann=ann, vggsound_cache=moved, out_root=out)
    assert not (out / "media").exists() and summary["media"] is None  # nothing decoded
    index = read_questions(out / "index.csv").set_index("id")
    assert index["status"].tolist() == ["ok", "ok", "missing_media", "missing_media", "ok"]
    assert "no_audio" in index.loc["3", "reason"] and "not in the media cache" in index.loc["4", "reason"]
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["media_cache"]["path"] == str(moved.resolve()) and recipe["media_cache"]["relative"] is None
    splits = AVQA(root=str(out), image_size=32).splits()
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1, 1, 1)
    assert splits.test[0]["audio"].shape == (1, 129, 626) and splits.test[0]["label"] == 3
    # the VGGSound cache moves: the reader names the fix, and a re-run with its new place needs no decoding
    elsewhere = tmp_path / "vgg2"
    moved.rename(elsewhere)
    with pytest.raises(CacheMissingError, match=r"not there \(moved or deleted\).*vggsound_cache="):
        AVQA(root=str(out)).splits()
    media.prep(avqa, ann=ann, vggsound_cache=elsewhere, out_root=out)
    assert len(AVQA(root=str(out), image_size=32).splits().test) == 1


# --- MUSIC-AVQA ---------------------------------------------------------------------------------------------------
def _music(qid: int, video: str, template: str, values: list, kind: list, answer: str) -> dict:
    return {
        "video_id": video,
        "question_id": qid,
        "type": json.dumps(kind),
        "question_content": template,
        "templ_values": json.dumps(values),
        "question_deleted": 0,
        "anser": answer,
    }


def test_music_avqa_fills_templates_and_classifies_over_train_answers(tmp_path):
    videos = tmp_path / "MUSIC-AVQA" / "videos"
    for i, name in enumerate(["00000001", "00000002", "00000003"]):
        media.write_video(
            videos / ("a" if i else "b") / f"{name}.mp4", SECONDS, shift=i, audio_rate=16000, audio_freq=media.SINE_HZ
        )
    ann = tmp_path / "MUSIC-AVQA" / "json"
    _write(
        ann / "avqa-train.json",
        [
            _music(
                0,
                "00000001",
                "Is the <Object> in the video always playing?",
                ["guitar"],
                ["Audio", "Existential"],
                "yes",
            ),
            _music(1, "00000002", "How many <Object> are sounding?", ["violins"], ["Audio-Visual", "Counting"], "two"),
            _music(
                2,
                "00000001",
                "Is the <Object> on the <LR> louder?",
                ["piano", "left"],
                ["Audio-Visual", "Comparative"],
                "no",
            ),
            _music(3, "00000002", "Where is the first sounding instrument?", [], ["Visual", "Location"], "left"),
        ],
    )
    _write(
        ann / "avqa-val.json",
        [_music(10, "00000003", "Is the <Object> playing?", ["cello"], ["Audio", "Existential"], "yes")],
    )
    _write(
        ann / "avqa-test.json",
        [
            _music(20, "00000003", "How many <Object> are sounding?", ["flutes"], ["Audio-Visual", "Counting"], "two"),
            _music(21, "00000003", "Which instrument sounds first?", [], ["Audio-Visual", "Temporal"], "banjo"),
        ],
    )
    out = tmp_path / "avqa_music"
    summary = media.prep(avqa, format="music", ann=tmp_path / "MUSIC-AVQA", media=videos, out_root=out)
    index = read_questions(out / "index.csv").set_index("id")
    assert index.loc["2", "question"] == "Is the piano on the left louder?"
    assert (index.loc["1", "qtype"], index.loc["1", "relation"]) == ("Counting", "Audio-Visual")
    assert index.loc["21", "status"] == "unknown_answer" and "'banjo'" in index.loc["21", "reason"]
    assert summary["skipped"] == {"unknown_answer": 1} and summary["max_choice_len"] is None
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["class_names"] == ["left", "no", "two", "yes"] and recipe["dataset"] == "avqa_music"
    assert recipe["question_types"] == ["Comparative", "Counting", "Existential", "Location", "Temporal"]
    with np.load(out / "tokens.npz") as npz:
        assert set(npz.files) == {"question", "question_length"}
    splits = AVQA(root=str(out), image_size=32).splits()
    assert splits.num_classes == 4 and splits.class_names == recipe["class_names"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4, 1, 1)  # MUSIC-AVQA's own val
    item = splits.test[0]
    assert set(item["question"]) == {"tokens", "length"} and item["label"] == 2
    assert item["qtype"] == 1 and splits.target_names["relation"][item["relation"]] == "Audio-Visual"
    batch = next(iter(DataLoader(splits.train, batch_size=4)))
    assert batch["question"]["tokens"].shape == (4, recipe["max_question_len"])


# --- errors -------------------------------------------------------------------------------------------------------
def test_a_missing_cache_names_the_prep_command(tmp_path):
    with pytest.raises(CacheMissingError, match=r"make prep-avqa ANN=.* OUT=.*nothing"):
        AVQA(root=str(tmp_path / "nothing")).splits()
    with pytest.raises(CacheMissingError, match=r"make prep-avqa FORMAT=music"):
        AVQA(root=str(tmp_path / "avqa_music")).splits()


def test_prep_refuses_unclear_inputs(tmp_path):
    (tmp_path / "ann").mkdir()
    with pytest.raises(PrepError, match="one of media= .* or vggsound_cache="):
        avqa.run([f"ann={tmp_path / 'ann'}"])
    with pytest.raises(PrepError, match="format='vqa'"):
        avqa.run([f"ann={tmp_path / 'ann'}", "media=x", "format=vqa"])
    with pytest.raises(PrepError, match=r"train_qa.json.*format=music"):
        avqa.run([f"ann={tmp_path / 'ann'}", f"media={tmp_path}", f"out_root={tmp_path / 'out'}"])
