"""AVQA / MUSIC-AVQA annotations -> question tables (tokens, answers, question types) over a media cache.

    python -m data_prep.avqa ann=/path/to/avqa media=/path/to/vggsound/videos
    python -m data_prep.avqa ann=/path/to/avqa vggsound_cache=/path/to/data/vggsound
    python -m data_prep.avqa format=music ann=/path/to/MUSIC-AVQA/json media=/path/to/MUSIC-AVQA/videos

Annotations (``ann=``: a folder; each file is looked for there, then anywhere below it):

* ``format=yang`` (default), AVQA of Yang et al. (ACM MM 2022): ``train_qa.json`` and ``val_qa.json``, lists of
  {id, video_name (``<ytid>_<start:06d>``, unpadded accepted), question_text, multi_choice (4 strings), answer
  (0-3), question_type, question_relation}. train_qa -> train, val_qa -> test (the release has no test split);
  the reader holds out ``val_fraction`` of the train videos as val. Labels: the answer's choice index.
* ``format=music``, MUSIC-AVQA: ``avqa-{train,val,test}.json``, lists of {video_id, question_id, type (a JSON
  list string ``'["Audio", "Counting"]'``: relation, then question type), question_content (every ``<...>`` slot
  filled in order from templ_values, a JSON list string), anser (sic: the answer word)}. Labels: the answer's
  index in the sorted answers of the train split; a val/test answer outside them: status ``unknown_answer``.

Media, decoded once with VGGSound's ``ogm_ge`` recipe (whole-clip 129 x 1,251 log spectrogram at 16 kHz, ten
1-fps frames), so the reader treats either source as a VGGSound cache:

* ``vggsound_cache=``: a cache of ``make prep-vggsound``; clips are looked up by ``<ytid>_<start:06d>``, nothing
  is decoded.
* ``media=`` (a folder, searched recursively for ``<video>.mp4`` etc.): each clip used by a question is cached once
  into ``<out_root>/media`` (resumable, like every prep). For MUSIC-AVQA's 60-s clips the 10-s recipe keeps the
  first 10 s of audio and frames: a limitation of reusing VGGSound's recipe.

Questions (one row each in ``index.csv``, never a crash): status ``ok``, or ``bad_item`` (a malformed entry),
``duplicate`` (an id seen before in the same file), ``empty_question`` (no word), ``unknown_answer`` (music),
``missing_media`` (no file, or a clip the media cache could not decode or does not hold; its reason copied).

Tokens (see :func:`onthefly.data.avqa.tokenize`): the vocabulary is built from the train split's questions
(and, for AVQA, their choices) whatever their media status, so it does not depend on which clips you have;
ids 0 = ``<pad>``, 1 = ``<unk>``, then words with at least ``min_count`` train occurrences by (-count, word).
Arrays are padded with 0 to ``max_question_len`` (default: the longest train question, at most 32) and
``max_choice_len`` (default: the longest train choice, at most 8); longer ones are cut (counted in the summary).
A choice with no word is stored as one ``<unk>`` (length 1, counted). Re-running reuses the media cache and
rewrites the question tables.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from data_prep.cache import Clip, code_version
from data_prep.errors import PrepError, UsageError
from data_prep.ids import VideoFiles, parse
from data_prep.pipeline import (
    CommonOptions,
    cli,
    default_out,
    existing_folder,
    frame_recipe,
    parse_args,
    process_av,
    run_prep,
)
from onthefly.data.avqa import (
    DATASETS,
    INDEX_COLUMNS,
    MEDIA_AUDIO,
    MEDIA_DATASET,
    MEDIA_DIR,
    N_CHOICES,
    PAD,
    TOKENS_FILE,
    UNK,
    VOCAB_FILE,
    tokenize,
)
from onthefly.data.base import CacheMissingError
from onthefly.data.cache import (
    FORMAT_VERSION,
    INDEX_FILE,
    OK,
    RECIPE_FILE,
    SPLITS,
    CacheReader,
    audio_recipe,
    read_json,
    write_json,
)

FILES = {
    "yang": {"train": "train_qa.json", "test": "val_qa.json"},
    "music": {"train": "avqa-train.json", "val": "avqa-val.json", "test": "avqa-test.json"},
}
ITEM_KEYS = {
    "yang": "{id, video_name, question_text, multi_choice, answer, question_type, question_relation}",
    "music": "{video_id, question_id, type, question_content, templ_values, anser}",
}
QUESTION_CAP, CHOICE_CAP = 32, 8  # default lengths: the longest train question / choice, at most these
CLIP_LABEL = "avqa_clip"  # the media cache's one placeholder class (clips have no label of their own)
SLOT = re.compile(r"<[^<>\s]+>")  # MUSIC-AVQA's template slots: <Object>, <LR>, <FL>, ...


@dataclass
class Options(CommonOptions):
    raw_root: Optional[str] = None  # the same as media=
    ann: str = ""  # the folder with the annotation files (required)
    media: Optional[str] = None  # a folder of raw clips, decoded into <out_root>/media
    vggsound_cache: Optional[str] = None  # or: a VGGSound cache (make prep-vggsound) to read the clips from
    format: str = "yang"  # yang: AVQA of Yang et al. | music: MUSIC-AVQA
    max_question_len: int = 0  # 0: the longest train question, at most 32
    max_choice_len: int = 0  # 0: the longest train choice, at most 8 (yang)
    min_count: int = 1  # a word needs this many train occurrences to get an id (else <unk>)


@dataclass
class Question:
    id: str
    video: str  # the clip id in the media cache (<ytid>_<start:06d> for VGGSound clips)
    split: str
    text: str = ""
    answer: str = ""  # as annotated: "0".."3" (yang) or the answer word (music)
    qtype: str = ""
    relation: str = ""
    choices: list[str] = dataclasses.field(default_factory=list)
    status: str = OK
    reason: str = ""


# --- reading the annotations ------------------------------------------------------------------------------------
def find_file(ann: Path, name: str, fmt: str) -> Path:
    if (ann / name).is_file():
        return ann / name
    found = sorted(ann.rglob(name))
    if not found:
        other = "music" if fmt == "yang" else "yang"
        raise PrepError(
            f"format={fmt} needs {' and '.join(FILES[fmt].values())} in ann={ann}; {name} is not "
            f"there (for the other release pass format={other})"
        )
    return found[0]


def load_items(path: Path) -> list:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PrepError(f"{path} is not readable JSON: {err}") from None
    if not isinstance(items, list):
        raise PrepError(f"{path} should hold a JSON list of questions, not a {type(items).__name__}")
    return items


def clip_id(name: str) -> str:
    """``<ytid>_<start:06d>`` for a VGGSound-style name (padded or not), else the name as it is."""
    parsed = parse(name)
    return f"{parsed[0]}_{parsed[1]:06d}" if parsed else name


def json_list(value: Any) -> list:
    """MUSIC-AVQA stores lists as JSON strings ('["Audio", "Counting"]'); accept real lists too."""
    value = json.loads(value) if isinstance(value, str) else value
    if not isinstance(value, list):
        raise ValueError(f"expected a list, got {value!r}")
    return value


def fill_slots(template: str, values: list) -> str:
    """Replace the ``<...>`` slots of a MUSIC-AVQA question, in order, by ``values`` (a slot left without a value
    keeps its name)."""
    values = iter(values)
    return SLOT.sub(lambda m: str(next(values, m.group(0)[1:-1])), template)


def parse_yang(item: dict, split: str) -> Question:
    choices = [str(c) for c in item["multi_choice"]]
    if len(choices) != N_CHOICES:
        raise ValueError(f"multi_choice has {len(choices)} entries, not {N_CHOICES}")
    answer = int(item["answer"])
    if not 0 <= answer < N_CHOICES:
        raise ValueError(f"answer {answer} is not a choice index 0-{N_CHOICES - 1}")
    return Question(
        str(item["id"]),
        clip_id(str(item["video_name"])),
        split,
        str(item["question_text"]),
        str(answer),
        str(item["question_type"]),
        str(item["question_relation"]),
        choices,
    )


def parse_music(item: dict, split: str) -> Question:
    kind = json_list(item["type"])
    if len(kind) < 2:
        raise ValueError(f"type {item['type']!r} should name a relation and a question type")
    answer = item["anser"] if "anser" in item else item["answer"]
    text = fill_slots(str(item["question_content"]), json_list(item.get("templ_values", "[]")))
    return Question(
        str(item["question_id"]), str(item["video_id"]), split, text, str(answer), str(kind[1]), str(kind[0])
    )


def read_annotations(ann: Path, fmt: str) -> tuple[list[Question], dict[str, str]]:
    """Every question of every split (malformed and duplicated ones with their status), and the files read."""
    parser = parse_yang if fmt == "yang" else parse_music
    questions, files = [], {}
    for split, name in FILES[fmt].items():
        path = find_file(ann, name, fmt)
        files[split] = str(path.resolve())
        seen: set[str] = set()
        for k, item in enumerate(load_items(path)):
            try:
                if not isinstance(item, dict):
                    raise ValueError(f"not an object: {str(item)[:60]!r}")
                q = parser(item, split)
            except (KeyError, ValueError, TypeError) as err:
                key = item.get("id", item.get("question_id", "")) if isinstance(item, dict) else ""
                what = f"missing key {err}" if isinstance(err, KeyError) else str(err)
                questions.append(
                    Question(str(key) or f"{name}#{k}", "", split, status="bad_item", reason=f"{name} item {k}: {what}")
                )
                continue
            if q.id in seen:
                q.status, q.reason = "duplicate", f"{name} item {k}: id {q.id} occurs earlier in the file"
            seen.add(q.id)
            questions.append(q)
    return questions, files


# --- tokens -----------------------------------------------------------------------------------------------------
def build_vocab(texts: list[list[str]], min_count: int) -> tuple[list[str], Counter]:
    counts = Counter(w for words in texts for w in words)
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return [PAD, UNK, *words], counts


def encode(words: list[str], lookup: dict[str, int], length: int) -> tuple[np.ndarray, int]:
    """Ids padded with 0 (or cut) to ``length``, and the number kept."""
    ids = [lookup.get(w, 1) for w in words[:length]]
    return np.asarray(ids + [0] * (length - len(ids)), dtype=np.int32), len(ids)


# --- media ------------------------------------------------------------------------------------------------------
def media_status(media: CacheReader) -> dict[str, tuple[str, str]]:
    """clip id -> (status, reason) of every clip the media cache lists."""
    return {r.id: (r.status, r.reason) for r in media.index[["id", "status", "reason"]].itertuples()}


def open_vggsound_cache(path: Path) -> CacheReader:
    try:
        media = CacheReader(path, MEDIA_DATASET)
        media.check({"dataset": MEDIA_DATASET, "audio": audio_recipe(MEDIA_DATASET, MEDIA_AUDIO)}, {})
    except CacheMissingError as err:
        raise PrepError(f"vggsound_cache={path}: {err}") from None
    return media


def decode_media(questions: list[Question], media: Path, out: Path, opts: Options) -> tuple[CacheReader, dict]:
    """Cache every clip a usable question names into ``out`` (a VGGSound-recipe cache); return its reader and
    the media prep's summary."""
    media = existing_folder(str(media), "media")
    files = VideoFiles([media])
    first_split: dict[str, str] = {}
    for q in questions:
        if q.status == OK:
            first_split.setdefault(q.video, q.split)
    clips = []
    for video in sorted(first_split):
        path = files.find(video)
        clip = Clip(
            video,
            CLIP_LABEL,
            first_split[video],
            {"video": str(path)} if path else {},
            source=path.relative_to(media).as_posix() if path else "",
        )
        if path is None:
            clip.status, clip.reason = "missing", f"no video file for {video} under {media}"
        clips.append(clip)
    rec = audio_recipe(MEDIA_DATASET, MEDIA_AUDIO)
    recipe = {"audio": rec, "frames": frame_recipe(opts), "min_audio_s": opts.min_audio_s}
    summary = run_prep(
        dataset=MEDIA_DATASET,
        clips=clips,
        out_root=out,
        recipe=recipe,
        streams=["visual"],
        array={"shape": rec["shape"], "dtype": rec["dtype"]},
        classes=[CLIP_LABEL],
        splits={"mode": "avqa", "media": str(media)},
        work=process_av,
        opts=opts,
        raw_root=media,
        expected=f"the clips the questions name, as <video>.mp4 (or .mkv, .webm, ...) files anywhere "
        f"under media={media}",
    )
    return CacheReader(out, MEDIA_DATASET), summary


# --- the run ----------------------------------------------------------------------------------------------------
def prep(opts: Options) -> dict[str, Any]:
    t0 = time.time()
    if opts.format not in FILES:
        raise UsageError(f"format={opts.format!r}: use yang (AVQA of Yang et al.) or music (MUSIC-AVQA)")
    if not opts.ann:
        raise UsageError("ann= is required: the folder with the annotation files")
    if min(opts.max_question_len, opts.max_choice_len) < 0 or opts.min_count < 1:
        raise UsageError("max_question_len= and max_choice_len= must be >= 0 (0: from the data), min_count= >= 1")
    media_arg = opts.media or opts.raw_root
    if bool(media_arg) == bool(opts.vggsound_cache):
        raise UsageError("give one of media= (a folder of clips to decode) or vggsound_cache= (a VGGSound cache)")
    ann = Path(opts.ann).expanduser()
    ann = ann.parent if ann.is_file() else ann
    ann = existing_folder(str(ann), "ann")
    dataset = DATASETS[opts.format]
    out = (Path(opts.out_root).expanduser() if opts.out_root else default_out(dataset)).resolve()
    if (out / RECIPE_FILE).exists() and not opts.overwrite:
        try:
            there = read_json(out / RECIPE_FILE).get("dataset")
        except (OSError, ValueError) as err:
            there = f"unknown (its recipe.json is damaged: {err})"
        if there != dataset:
            raise PrepError(
                f"{out} holds a {there} cache: pick another out_root= (OUT=), or pass overwrite=true "
                "(ARGS=overwrite=true) to replace its question tables"
            )
    questions, files = read_annotations(ann, opts.format)
    music = opts.format == "music"

    # words and lengths: the train split's text only
    words = {id(q): tokenize(q.text) for q in questions}
    choice_words = {id(q): [tokenize(c) for c in q.choices] for q in questions}
    for q in questions:
        if q.status == OK and not words[id(q)]:
            q.status, q.reason = "empty_question", f"the question {q.text!r} has no word"
    train = [q for q in questions if q.split == "train" and q.status == OK]
    if not train:
        usable = sum(q.status == OK for q in questions)
        raise PrepError(
            f"{dataset}: no usable train question in {files['train']} ({len(questions)} questions read "
            f"in all, {usable} usable): the vocabulary and the answers come from the train split. Expected "
            f"a JSON list of {ITEM_KEYS[opts.format]}."
        )
    vocab, counts = build_vocab(
        [words[id(q)] for q in train] + [c for q in train for c in choice_words[id(q)]], opts.min_count
    )
    lookup = {w: i for i, w in enumerate(vocab)}
    longest_choice = max((len(c) for q in train for c in choice_words[id(q)]), default=1)
    q_len = opts.max_question_len or min(QUESTION_CAP, max((len(words[id(q)]) for q in train), default=1))
    c_len = opts.max_choice_len or min(CHOICE_CAP, max(1, longest_choice))  # an empty choice is one <unk>
    if music:
        answers = sorted({q.answer for q in train})
        known = set(answers)
        for q in questions:
            if q.status == OK and q.answer not in known:
                q.status, q.reason = "unknown_answer", f"the answer {q.answer!r} never occurs in the train split"
        class_names = answers
    else:
        class_names = [f"choice {i}" for i in range(N_CHOICES)]

    # media
    if opts.vggsound_cache:
        media = open_vggsound_cache(Path(opts.vggsound_cache).expanduser().resolve())
        relative, source, media_summary = None, {"vggsound_cache": str(media.root)}, None
    else:
        media_root = Path(media_arg).expanduser().resolve()
        media, media_summary = decode_media(questions, media_root, out / MEDIA_DIR, opts)
        relative, source = MEDIA_DIR, {"media": str(media_root)}
    status = media_status(media)
    for q in questions:
        if q.status != OK:
            continue
        clip_status, clip_reason = status.get(q.video, (None, ""))
        if clip_status is None:
            q.status, q.reason = "missing_media", f"clip {q.video} is not in the media cache {media.root}"
        elif clip_status != OK:
            q.status, q.reason = "missing_media", f"clip {q.video}: {clip_status}: {clip_reason}"

    # tables
    n = len(questions)
    question = np.zeros((n, q_len), np.int32)
    question_length = np.zeros(n, np.int32)
    choices = np.zeros((n, N_CHOICES, c_len), np.int32)
    choice_length = np.zeros((n, N_CHOICES), np.int32)
    cut = Counter()
    rows = []
    for i, q in enumerate(questions):
        question[i], question_length[i] = encode(words[id(q)], lookup, q_len)
        cut["questions"] += len(words[id(q)]) > q_len
        for j, cw in enumerate(choice_words[id(q)]):
            if not cw:
                cw, cut["empty_choices"] = [UNK], cut["empty_choices"] + 1
            choices[i, j], choice_length[i, j] = encode(cw, lookup, c_len)
            cut["choices"] += len(cw) > c_len
        if q.status in (OK, "missing_media"):
            label = class_names.index(q.answer) if music else int(q.answer)
        else:
            label = -1
        rows.append(
            {
                "id": q.id,
                "video": q.video,
                "split": q.split,
                "status": q.status,
                "reason": q.reason,
                "answer": q.answer,
                "label": label,
                "qtype": q.qtype,
                "relation": q.relation,
                "question": q.text,
            }
        )
    index = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    arrays = {"question": question, "question_length": question_length}
    if not music:
        arrays.update(choices=choices, choice_length=choice_length)

    parsed = [q for q in questions if q.status not in ("bad_item", "duplicate")]
    usable = index["status"] == OK
    per_split = {
        s: {"listed": int((index["split"] == s).sum()), "usable": int((usable & (index["split"] == s)).sum())}
        for s in SPLITS
        if (index["split"] == s).any()
    }
    summary = {
        "dataset": dataset,
        "out_root": str(out),
        "questions": n,
        "usable": int(usable.sum()),
        "skipped": {k: int(v) for k, v in Counter(index.loc[~usable, "status"]).most_common()},
        "example_reason": {k: str(v) for k, v in index[~usable].groupby("status")["reason"].first().items()},
        "per_split": per_split,
        "clips_used": int(index.loc[usable, "video"].nunique()),
        "vocab_size": len(vocab),
        "max_question_len": int(q_len),
        "max_choice_len": None if music else int(c_len),
        "truncated": {"questions": cut["questions"], **({} if music else {"choices": cut["choices"]})},
        "empty_choices": cut["empty_choices"],
        "seconds": round(time.time() - t0, 2),
        "media": None
        if media_summary is None
        else {k: media_summary[k] for k in ("found", "cached", "processed_now", "reused", "skipped")},
    }
    recipe = {
        "format": FORMAT_VERSION,
        "dataset": dataset,
        "code_version": code_version(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "annotations": {"format": opts.format, "root": str(ann.resolve()), "files": files},
        "media_cache": {
            "path": str(media.root),
            "relative": relative,
            **source,
            "dataset": MEDIA_DATASET,
            "audio": MEDIA_AUDIO,
            "frames": media.recipe.get("frames"),
        },
        "tokenizer": {
            "rule": "lower-case; words are runs of letters and digits, inner apostrophes kept",
            "min_count": opts.min_count,
            "pad": 0,
            "unk": 1,
        },
        "vocab_size": len(vocab),
        "max_question_len": int(q_len),
        "max_choice_len": None if music else int(c_len),
        "num_choices": None if music else N_CHOICES,
        "class_names": class_names,
        "question_types": sorted({q.qtype for q in parsed}),
        "relations": sorted({q.relation for q in parsed}),
        "splits": {
            "source": (
                {
                    "train": "train_qa.json",
                    "test": "val_qa.json",
                    "val": "held out by the reader: dataset.val_fraction of the train videos",
                }
                if not music
                else dict(FILES["music"])
            ),
            "usable": {s: c["usable"] for s, c in per_split.items()},
        },
        "summary": summary,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / VOCAB_FILE,
        {"tokens": vocab, "train_counts": [counts.get(w, 0) for w in vocab], "min_count": opts.min_count},
    )
    tmp = out / (TOKENS_FILE + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, out / TOKENS_FILE)
    tmp = out / (INDEX_FILE + ".tmp")
    index.to_csv(tmp, index=False)
    os.replace(tmp, out / INDEX_FILE)
    write_json(out / RECIPE_FILE, recipe)
    print(format_summary(summary, recipe))
    if not summary["usable"]:
        raise PrepError(
            f"{dataset}: no question is usable ({', '.join(f'{k} {v}' for k, v in summary['skipped'].items())}); "
            f"each question's status and reason: {out / INDEX_FILE}. Expected their clips in "
            f"{source.get('media') or source.get('vggsound_cache')}."
        )
    return summary


def format_summary(s: dict[str, Any], recipe: dict[str, Any]) -> str:
    skipped = sum(s["skipped"].values())
    lines = [
        f"{s['dataset']}: {s['questions']} questions -> {s['out_root']}  ({s['seconds']:.1f} s)",
        f"  usable   {s['usable']:>7}   over {s['clips_used']} clips of the media cache "
        f"{recipe['media_cache']['path']}",
        f"  skipped  {skipped:>7}   " + ", ".join(f"{k} {v}" for k, v in s["skipped"].items()),
    ]
    lines += [f"    {status}: e.g. {reason}" for status, reason in s["example_reason"].items()]
    lines.append(
        f"  vocabulary {s['vocab_size']} (with <pad>, <unk>); question length {s['max_question_len']} "
        f"({s['truncated']['questions']} cut)"
        + (
            f"; choice length {s['max_choice_len']} ({s['truncated']['choices']} cut, {s['empty_choices']} empty)"
            if s["max_choice_len"]
            else ""
        )
        + f"; {len(recipe['class_names'])} classes, {len(recipe['question_types'])} question types, "
        f"{len(recipe['relations'])} relations"
    )
    lines.append(f"  {'split':<8} {'listed':>7} {'usable':>7}")
    lines += [f"  {split:<8} {c['listed']:>7} {c['usable']:>7}" for split, c in s["per_split"].items()]
    lines.append(f"  index (a status and reason per question): {Path(s['out_root']) / INDEX_FILE}")
    return "\n".join(lines)


def run(argv: list[str]) -> dict[str, Any]:
    """The prep of ``argv`` (key=value options): its summary, or a PrepError."""
    usage = (
        "python -m data_prep.avqa ann=/path/to/annotations (media=/path/to/videos | "
        "vggsound_cache=/path/to/vggsound/cache) [format=yang|music] [out_root=...]"
    )
    return prep(parse_args(argv, Options, usage))


def main(argv=None) -> int:
    return cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
