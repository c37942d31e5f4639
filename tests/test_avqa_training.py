"""AVQA end to end: generated clips and question files -> `data_prep.avqa` -> training with the question encoder
and the question-conditioned head, balancing audio against visual (ρ from zero-out, the question kept)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from data_prep import avqa
from onthefly.config import compose
from onthefly.engine.run import run

import media

QTYPES = ["Which", "Come From", "Happening"]
RELATIONS = ["Audio", "Visual", "Both"]
WORDS = ["dog", "piano", "guitar", "car", "bird", "drum"]


def _name(i: int) -> str:
    return f"{media.ytid(i)}_{7 * i + 1:06d}"


@pytest.fixture(scope="module")
def avqa_cache(tmp_path_factory):
    """8 clips, 24 train and 8 test questions (every type and relation), prepared from raw mp4 files."""
    root = tmp_path_factory.mktemp("avqa_train")
    for i in range(8):
        media.write_video(root / "videos" / f"{_name(i)}.mp4", 2.0, shift=i, audio_rate=16000, audio_freq=media.SINE_HZ)

    def item(qid: int, clip: int) -> dict:
        answer = qid % 4
        return {
            "id": qid,
            "video_name": _name(clip),
            "question_text": f"what {WORDS[qid % 6]} is heard here",
            "multi_choice": [WORDS[(answer + k) % 6] for k in range(4)],
            "answer": answer,
            "question_type": QTYPES[qid % 3],
            "question_relation": RELATIONS[(qid // 3) % 3],
        }

    (root / "ann").mkdir()
    (root / "ann" / "train_qa.json").write_text(json.dumps([item(q, q % 6) for q in range(24)]))
    (root / "ann" / "val_qa.json").write_text(json.dumps([item(100 + q, 6 + q % 2) for q in range(8)]))
    media.prep(avqa, ann=root / "ann", media=root / "videos", out_root=root / "cache")
    return root / "cache"


def avqa_overrides(cache, *extra):
    return [
        "dataset=avqa",
        f"dataset.root={cache}",
        "dataset.image_size=32",
        "dataset.audio_crop=128",
        "dataset.num_frames=2",
        "dataset.val_fraction=0.25",
        "backbone=resnet18_small",
        "backbone.context.question.width=16",
        "backbone.context.question.embed_dim=8",
        "fusion.hidden=16",
        "debug=fast",
        "trainer.epochs=2",
        "trainer.batch_size=6",
        "trainer.eval_batch_size=8",
        "trainer.limit_train_batches=null",
        "trainer.limit_eval_batches=null",
        "trainer.threads=1",
        "trainer.plots=false",
        "trainer.save_checkpoint=false",
        *extra,
    ]


@pytest.mark.parametrize(
    "modulation,logged",
    [
        ("none", ["rho", "acc"]),
        ("ogm_ge", ["rho", "k"]),
        ("opm", ["rho", "q", "drop"]),
    ],
)
def test_avqa_trains_and_reports_accuracy_per_question_type_and_relation(avqa_cache, tmp_path, modulation, logged):
    out = tmp_path / modulation
    results = run(compose(avqa_overrides(avqa_cache, f"modulation={modulation}")), out)
    assert results["status"] == "ok" and results["modalities"] == ["audio", "visual"]
    assert results["num_classes"] == 4
    steps = pd.read_csv(out / "steps.csv")
    for name in logged:
        for m in ("audio", "visual"):
            assert steps[f"train/{name}_{m}"].notna().all(), f"train/{name}_{m}"
    assert not any(c.startswith("train/rho_question") for c in steps.columns)  # the question is not balanced
    test = results["test"]
    assert 0 <= test["acc"] <= 1 and {"acc_audio", "acc_visual"} <= set(test)
    per_type = {k for k in test if k.startswith("acc_qtype_")}
    per_relation = {k for k in test if k.startswith("acc_relation_")}
    assert per_type == {"acc_qtype_which", "acc_qtype_come_from", "acc_qtype_happening"}
    assert per_relation == {"acc_relation_audio", "acc_relation_visual", "acc_relation_both"}


def test_avqa_zero_out_is_the_natural_estimator_of_the_qa_head(avqa_cache, tmp_path):
    a = run(compose(avqa_overrides(avqa_cache, "modulation=ogm_ge", "trainer.epochs=1")), tmp_path / "natural")
    b = run(
        compose(avqa_overrides(avqa_cache, "modulation=ogm_ge", "trainer.epochs=1", "discrepancy.estimator=zero_out")),
        tmp_path / "zero",
    )
    assert a["last"]["train/rho_audio"] == pytest.approx(b["last"]["train/rho_audio"])


def test_avqa_presets_compose_the_question_model():
    for method in ("none", "ogm_ge", "opm", "opm_ogm"):
        cfg = compose([f"experiment=tpami2024/avqa_{method}"])
        assert cfg.dataset._target_.endswith("AVQA") and cfg.fusion._target_.endswith("QuestionConditionedFusion")
        assert cfg.backbone.name == "resnet18" and "question" in cfg.backbone.context
    music = compose(["experiment=tpami2024/avqa_opm", "dataset=avqa_music"])
    assert music.fusion.answer.value == "vocabulary" and music.dataset.root.endswith("avqa_music")


def test_a_plain_fusion_head_on_avqa_fails_naming_the_qa_head(avqa_cache, tmp_path):
    with pytest.raises(ValueError, match="fusion=qa"):
        run(
            compose([o for o in avqa_overrides(avqa_cache, "fusion=concat") if not o.startswith("fusion.")]),
            tmp_path / "bad",
        )


def test_music_avqa_trains_an_answer_classifier(tmp_path):
    videos = tmp_path / "videos"
    names = [f"{i:08d}" for i in range(1, 5)]
    for i, name in enumerate(names):
        media.write_video(videos / f"{name}.mp4", 2.0, shift=i, audio_rate=16000, audio_freq=media.SINE_HZ)
    answers = ["yes", "no", "two", "left"]

    def item(qid: int, video: str) -> dict:
        return {
            "video_id": video,
            "question_id": qid,
            "type": json.dumps([RELATIONS[qid % 3], QTYPES[qid % 3]]),
            "question_content": "Is the <Object> playing?",
            "templ_values": json.dumps([WORDS[qid % 6]]),
            "anser": answers[qid % 4],
        }

    ann = tmp_path / "json"
    ann.mkdir()
    (ann / "avqa-train.json").write_text(json.dumps([item(q, names[q % 3]) for q in range(12)]))
    (ann / "avqa-val.json").write_text(json.dumps([item(20 + q, names[q % 3]) for q in range(6)]))
    (ann / "avqa-test.json").write_text(json.dumps([item(40 + q, names[3]) for q in range(6)]))
    media.prep(avqa, format="music", ann=ann, media=videos, out_root=tmp_path / "cache")
    overrides = [o for o in avqa_overrides(tmp_path / "cache", "modulation=opm_ogm") if not o.startswith("dataset=")]
    results = run(compose(["dataset=avqa_music", *overrides]), tmp_path / "run")
    assert results["status"] == "ok" and results["num_classes"] == len(answers)
    assert 0 <= results["test"]["acc"] <= 1 and any(k.startswith("acc_qtype_") for k in results["test"])
