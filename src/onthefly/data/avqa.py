"""AVQA and MUSIC-AVQA (audio-visual question answering) from the cache of `make prep-avqa`.

The cache (``data/avqa``, or ``data/avqa_music`` for MUSIC-AVQA) holds the question tables: ``recipe.json``,
``index.csv`` (one row per question: id, video, split, status, reason, answer, label, qtype, relation, question),
``vocab.json`` and ``tokens.npz`` (padded token ids, rows aligned with index.csv). Audio and frames come from a
VGGSound-recipe media cache (the one prep built under ``<root>/media``, or the VGGSound cache it was pointed at
with ``vggsound_cache=``), read exactly as VGGSound's: the whole-clip 129 x 1,251 log spectrogram with a
626-frame (5-s) crop, T of the ten 1-fps frames.

Splits. AVQA (Yang et al.) releases ``train_qa`` and ``val_qa`` only, with no test split: ``val_qa`` is our test,
and our val is ``val_fraction`` of the train split's *videos* (all of their questions), chosen with ``val_seed``,
so no clip is in both. MUSIC-AVQA's train / val / test are its own.

Tokens: lower-case, words are runs of letters and digits, an apostrophe inside a word kept ("what's");
ids 0 = ``<pad>``, 1 = ``<unk>``, then the train split's words by count (ties alphabetical).
"""

import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Optional

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from onthefly.config import Range, configurable
from onthefly.data.base import CacheDamagedError, CacheMissingError, DataSplits
from onthefly.data.cache import (
    FORMAT_VERSION,
    INDEX_FILE,
    OK,
    RECIPE_FILE,
    SPLITS,
    CacheMismatchError,
    CacheReader,
    audio_recipe,
    index_counts,
    load_json,
    prep_command,
)
from onthefly.data.clips import CachedClips, ClipCache, split_positions, stratified_holdout

log = logging.getLogger("onthefly")

DATASETS = {"yang": "avqa", "music": "avqa_music"}  # annotation format -> cache name (and PREP_COMMANDS key)
VOCAB_FILE = "vocab.json"
TOKENS_FILE = "tokens.npz"  # question [N, Lq], question_length [N]; yang also choices [N, 4, Lc], choice_length [N, 4]
MEDIA_DIR = "media"  # the media cache prep builds from media= (a VGGSound-recipe cache)
MEDIA_DATASET, MEDIA_AUDIO = "vggsound", "ogm_ge"
INDEX_COLUMNS = ["id", "video", "split", "status", "reason", "answer", "label", "qtype", "relation", "question"]
PAD, UNK = "<pad>", "<unk>"
N_CHOICES = 4
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def tokenize(text: str) -> list[str]:
    """Lower-case words: runs of letters and digits (any script); an apostrophe between two of them stays inside
    the word ("what's"); everything else separates words."""
    return _WORD.findall(str(text).lower().replace("\u2019", "'"))


def read_questions(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={c: str for c in INDEX_COLUMNS if c != "label"}, keep_default_na=False)


def media_cache_path(root: Path, recipe: dict[str, Any]) -> Path:
    """Where the media cache is: ``<root>/<relative>`` for one prep built inside the AVQA cache (so the folder
    can move as a whole), else the absolute path recorded."""
    media = recipe.get("media_cache") or {}
    if media.get("relative") and (root / media["relative"]).exists():
        return root / media["relative"]
    return Path(media.get("path", ""))


class AVQAQuestions(Dataset):
    """One split's questions over a :class:`CachedClips` of their clips (a clip shared by several questions is
    stored once). Items: {"audio", "visual" (as CachedClips yields them), "question": {"tokens": [Lq],
    "length": scalar, "choices": [4, Lc], "choice_lengths": [4]} (choices only for AVQA), "label", "qtype",
    "relation", "index"}."""

    def __init__(
        self,
        clips: CachedClips,
        clip_of: np.ndarray,
        rows: pd.DataFrame,
        labels: np.ndarray,
        qtypes: np.ndarray,
        relations: np.ndarray,
        tokens: dict[str, np.ndarray],
    ):
        self.clips, self.clip_of = clips, np.asarray(clip_of, dtype=np.int64)
        self.rows = rows.reset_index(drop=True)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.qtypes, self.relations = np.asarray(qtypes, np.int64), np.asarray(relations, np.int64)
        self.tokens = {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in tokens.items()}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.clips[int(self.clip_of[i])]
        question = {
            "tokens": torch.from_numpy(self.tokens["question"][i]),
            "length": torch.tensor(self.tokens["question_length"][i]),
        }
        if "choices" in self.tokens:
            question["choices"] = torch.from_numpy(self.tokens["choices"][i])
            question["choice_lengths"] = torch.from_numpy(self.tokens["choice_length"][i])
        item.update(
            question=question,
            label=int(self.labels[i]),
            qtype=int(self.qtypes[i]),
            relation=int(self.relations[i]),
            index=i,
        )
        return item


@configurable("dataset")
@dataclass(eq=False)
class AVQA(ClipCache):
    """Four-way multiple-choice AVQA (Yang et al.), or MUSIC-AVQA's open answers classified over the train
    split's answer vocabulary; which one comes from the cache's recipe.json. Audio and visual are the balanced
    modalities; the question is context (``DataSplits.context``) and question type and relation are extra
    targets for per-type accuracy. ``audio_crop``: frames of the media cache's 10-s spectrogram each sample takes.
    """

    name: ClassVar[str] = "avqa"
    all_modalities: ClassVar[tuple[str, ...]] = ("audio", "visual")

    root: str = "data/avqa"
    audio_crop: Annotated[int, Range(ge=1)] = 626

    # --- opening ----------------------------------------------------------------------------------------------
    def _command(self, recipe: Optional[dict] = None, out: Optional[str] = None) -> str:
        """The prep command for this cache (MUSIC-AVQA's when the recipe says so or, with no cache yet, when the
        folder's name holds "music")."""
        name = recipe.get("dataset") if recipe else ("avqa_music" if "music" in self.root.name.lower() else "avqa")
        return prep_command(name if name in DATASETS.values() else "avqa", out or self.root)

    def _read_recipe(self) -> dict[str, Any]:
        if not (self.root / RECIPE_FILE).exists():
            command = self._command()
            other = "" if "FORMAT=music" in command else f" (MUSIC-AVQA: `{prep_command('avqa_music', self.root)}`)"
            raise CacheMissingError(
                f"No AVQA cache at {self.root}. Build it with `{command}`{other}, or point paths.data_root (env "
                "ONTHEFLY_DATA) or dataset.root at the folder that holds it."
            )
        recipe = load_json(self.root / RECIPE_FILE, self._rewrite(None, overwrite=True))
        if recipe.get("dataset") not in DATASETS.values():
            raise CacheMismatchError(
                f"{self.root} holds a {recipe.get('dataset')} cache, not an AVQA one: set "
                f"dataset.root to an AVQA cache, or build one with `{self._command()}`."
            )
        if recipe.get("format") != FORMAT_VERSION:
            raise CacheMismatchError(
                f"The AVQA cache at {self.root} has format {recipe.get('format')}; this code "
                f"reads format {FORMAT_VERSION}. Rebuild it with `{self._command(recipe)}`."
            )
        missing = [f for f in (INDEX_FILE, TOKENS_FILE) if not (self.root / f).exists()]
        if missing:
            raise CacheMissingError(
                f"The AVQA cache at {self.root} is incomplete ({', '.join(missing)} missing). "
                f"Run `{self._command(recipe)}` again."
            )
        return recipe

    def _rewrite(self, recipe: Optional[dict], overwrite: bool = False) -> str:
        """The sentence that says how to repair the question tables: the prep rewrites all of them (and reuses
        its media cache)."""
        return (
            f"Run `{self._command(recipe)}{' ARGS=overwrite=true' if overwrite else ''}` again: it rewrites the "
            "question tables (recipe.json, index.csv, vocab.json, tokens.npz) and reuses the media cache."
        )

    def _read_tables(self, recipe: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
        """index.csv and tokens.npz, checked against each other and against what recipe.json recorded (rows,
        usable questions per split, vocabulary size): a damaged or edited table names itself and the fix."""
        fix = self._rewrite(recipe)
        try:
            index = read_questions(self.root / INDEX_FILE)
            missing = [c for c in INDEX_COLUMNS if c not in index.columns]
            if missing:
                raise ValueError(f"no column {missing}")
            index["label"] = index["label"].astype(np.int64)
        except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
            raise CacheDamagedError(f"{self.root / INDEX_FILE} is damaged ({err}). {fix}") from None
        have = index_counts(index)
        usable = {s: (recipe.get("splits") or {}).get("usable", {}).get(s, 0) for s in SPLITS}
        rows = (recipe.get("summary") or {}).get("questions", have["rows"])
        if have["ok"] != usable or have["rows"] != rows:
            raise CacheDamagedError(
                f"{self.root / INDEX_FILE} has {have['rows']} questions, usable per split {have['ok']}, where the "
                f"prep wrote {rows}, usable {usable} (recipe.json): rows were deleted or edited, and training would "
                f"silently use other questions. {fix}"
            )
        try:
            with np.load(self.root / TOKENS_FILE) as npz:
                tokens = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise CacheDamagedError(
                f"{self.root / TOKENS_FILE} is damaged ({type(err).__name__}: {err}). {fix}"
            ) from None
        if "question" not in tokens or any(len(v) != len(index) for v in tokens.values()):
            raise CacheDamagedError(
                f"{self.root / TOKENS_FILE} does not hold a token row per question of "
                f"{INDEX_FILE} ({len(index)}; a prep was interrupted?). {fix}"
            )
        vocab = load_json(self.root / VOCAB_FILE, fix) if (self.root / VOCAB_FILE).exists() else None
        size = int(recipe["vocab_size"])
        if vocab is not None and len(vocab.get("tokens", [])) != size:
            raise CacheDamagedError(
                f"{self.root / VOCAB_FILE} holds {len(vocab.get('tokens', []))} words where "
                f"recipe.json says {size}. {fix}"
            )
        if len(tokens["question"]) and (tokens["question"].min() < 0 or tokens["question"].max() >= size):
            raise CacheDamagedError(
                f"{self.root / TOKENS_FILE} holds token ids outside the vocabulary of {size} words. {fix}"
            )
        return index, tokens

    def open(self) -> CacheReader:
        return self.open_media(self._read_recipe())

    def open_media(self, recipe: dict[str, Any]) -> CacheReader:
        """The media cache, checked against the VGGSound recipe and ``frame_short_side``."""
        path = media_cache_path(self.root, recipe)
        if not (path / RECIPE_FILE).exists():
            raise CacheMissingError(
                f"The AVQA cache at {self.root} reads audio and frames from the media cache {path}, which is not "
                f"there (moved or deleted). Run `{self._command(recipe)}` again: with MEDIA= (media=) it rebuilds "
                "its own media cache; with VGGSOUND_CACHE= (vggsound_cache=) naming where your VGGSound cache is "
                "now, only the question tables are rewritten."
            )
        own = (recipe.get("media_cache") or {}).get("relative")  # built by the AVQA prep (else a VGGSound cache)
        media = CacheReader(path, MEDIA_DATASET, command=self._command(recipe) if own else None)
        expected = {
            "dataset": MEDIA_DATASET,
            "audio": audio_recipe(MEDIA_DATASET, MEDIA_AUDIO),
            "frames.short_side": self.frame_short_side,
        }
        try:
            media.check(expected, {"frames.short_side": f"ARGS=short_side={self.frame_short_side}"})
        except CacheMismatchError as err:
            raise CacheMismatchError(
                f"{err}\n(This is the media cache of the AVQA cache at {self.root}. Set dataset.frame_short_side "
                "to the cache's value, or build an AVQA cache with its own media: "
                f"`{self._command(recipe, '<folder>')} ARGS=short_side={self.frame_short_side}`, then set "
                "dataset.root=<folder>.)"
            ) from None
        return media

    # --- splits -----------------------------------------------------------------------------------------------
    def _split_positions(self, ok: pd.DataFrame) -> dict[str, np.ndarray]:
        """Question positions of train / val / test; val = a held-out share of the train videos when the cache
        has no val split."""

        def by_video(train: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
            """All questions of a held-out share of the train videos (no clip in both train and val)."""
            videos, of = np.unique(ok["video"].to_numpy()[train], return_inverse=True)
            _, held = stratified_holdout(np.arange(len(videos)), np.zeros(len(videos)), fraction, self.val_seed)
            in_val = np.isin(of, held)
            return train[~in_val], train[in_val]

        return split_positions(ok["split"].to_numpy(), self.root, "question", self.val_fraction, by_video)

    def splits(self) -> DataSplits:
        recipe = self._read_recipe()
        index, tokens = self._read_tables(recipe)
        media = self.open_media(recipe)
        clips = media.ok_rows().reset_index(drop=True)
        clip_pos = pd.Series(np.arange(len(clips)), index=clips["id"].to_numpy())
        usable = (index["status"] == OK).to_numpy()
        in_media = index["video"].isin(clip_pos.index).to_numpy()
        if (usable & ~in_media).any():
            log.warning(
                "%d AVQA questions marked ok name clips that the media cache %s no longer holds; they are "
                "left out (re-run `%s` to record them)",
                int((usable & ~in_media).sum()),
                media.root,
                self._command(recipe),
            )
        keep = np.flatnonzero(usable & in_media)
        ok = index.iloc[keep].reset_index(drop=True)
        tokens = {k: v[keep] for k, v in tokens.items()}
        qtype_names, relation_names = list(recipe["question_types"]), list(recipe["relations"])
        qtypes = ok["qtype"].map({n: i for i, n in enumerate(qtype_names)}).to_numpy()
        relations = ok["relation"].map({n: i for i, n in enumerate(relation_names)}).to_numpy()
        labels = ok["label"].to_numpy(dtype=np.int64)
        clip_rows = clip_pos.loc[ok["video"].to_numpy()].to_numpy()
        parts = self._split_positions(ok)
        log.info(
            "%s cache %s: %s questions (train/val/test) over the media cache %s",
            recipe["dataset"],
            self.root,
            "/".join(str(len(parts[s])) for s in ("train", "val", "test")),
            media.root,
        )

        def make(split: str, train: bool) -> AVQAQuestions:
            idx = parts[split]
            unique, clip_of = np.unique(clip_rows[idx], return_inverse=True)
            split_clips = CachedClips(media, clips.iloc[unique], np.zeros(len(unique), np.int64), self, train)
            return AVQAQuestions(
                split_clips,
                clip_of,
                ok.iloc[idx],
                labels[idx],
                qtypes[idx],
                relations[idx],
                {k: v[idx] for k, v in tokens.items()},
            )

        class_names = list(recipe["class_names"])
        return DataSplits(
            train=make("train", True),
            val=make("val", False),
            test=make("test", False),
            train_eval=make("train", False),
            num_classes=len(class_names),
            modalities=list(self.modalities),
            class_names=class_names,
            encoder_args={"question": {"vocab_size": int(recipe["vocab_size"])}},
            context=["question"],
            targets=["qtype", "relation"],
            target_names={"qtype": qtype_names, "relation": relation_names},
        )
