"""Tasks (losses, class logits, metrics), the MOSI metric functions, sequence encoders and the AVQA head."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from onthefly.engine.metrics import binary_scores, pearson, seven_class_accuracy
from onthefly.models.fusion import ConcatFusion, QuestionConditionedFusion
from onthefly.models.multimodal import MultimodalModel
from onthefly.models.sequence import LSTMSequenceEncoder, QuestionEncoder, TransformerSequenceEncoder
from onthefly.tasks import Classification, Sentiment


def splits(num_classes=2, targets=(), target_names=None):
    return SimpleNamespace(num_classes=num_classes, targets=list(targets), target_names=target_names or {})


# --- metric functions on hand-computed values -------------------------------------------------------------------
def test_binary_scores_accuracy_and_weighted_f1():
    pred = torch.tensor([1, 1, 0, 0, 1]).bool()
    target = torch.tensor([1, 0, 0, 1, 1]).bool()
    acc, f1 = binary_scores(pred, target)
    # positive: tp 2, 3 predicted, 3 true -> F1 4/6; negative: tp 1, 2 predicted, 2 true -> 2/4; weights 3/5, 2/5
    assert acc == pytest.approx(3 / 5)
    assert f1 == pytest.approx(3 / 5 * 4 / 6 + 2 / 5 * 2 / 4)


def test_binary_scores_one_class_and_empty():
    acc, f1 = binary_scores(torch.tensor([True, True]), torch.tensor([True, True]))
    assert (acc, f1) == (1.0, 1.0)
    acc, f1 = binary_scores(torch.tensor([False, False]), torch.tensor([True, True]))
    assert (acc, f1) == (0.0, 0.0)
    assert all(math.isnan(v) for v in binary_scores(torch.tensor([]), torch.tensor([])))


def test_pearson_hand_value_and_degenerate():
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 7.0])) == pytest.approx(15 / math.sqrt(228))
    assert pearson(torch.tensor([1.0, 2.0]), torch.tensor([-1.0, -2.0])) == pytest.approx(-1.0)
    assert math.isnan(pearson(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 2.0])))


def test_seven_class_accuracy_clips_and_rounds_halves_to_even():
    pred = torch.tensor([2.6, -0.4, 3.7, -2.5, 1.5])
    score = torch.tensor([3.0, 0.0, 2.9, -2.0, 1.0])
    # rounded: pred 3, -0, 3 (clipped), -2 (half to even), 2 | score 3, 0, 3, -2, 1 -> 4 of 5
    assert seven_class_accuracy(pred, score) == pytest.approx(4 / 5)


# --- tasks -------------------------------------------------------------------------------------------------------
def test_classification_reports_accuracy_per_question_type_and_relation():
    task = Classification()
    task.setup(splits(4, ["qtype", "relation"], {"qtype": ["Which", "Come From"], "relation": ["Audio", "Both"]}))
    outputs = torch.eye(4)[[0, 1, 2, 3]] * 5  # predicts 0, 1, 2, 3
    labels = torch.tensor([0, 1, 0, 0])  # right, right, wrong, wrong
    batch = {"qtype": torch.tensor([0, 0, 1, 1]), "relation": torch.tensor([1, 0, 1, 1])}
    m = task.metrics(outputs, labels, batch)
    assert m["acc"] == 0.5
    assert m["acc_qtype_which"] == 1.0 and m["acc_qtype_come_from"] == 0.0
    assert m["acc_relation_audio"] == 1.0 and m["acc_relation_both"] == pytest.approx(1 / 3)
    assert "loss" in m and "map" in m


def test_sentiment_classification_head_metrics_with_and_without_neutral():
    task = Sentiment(head="classification")
    task.setup(splits(2, ["score"]))
    assert task.output_dim(2) == 2
    score = torch.tensor([1.2, -0.8, 0.0, -2.0])
    labels = (score >= 0).long()
    outputs = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # pred pos, pos, neg, neg
    m = task.metrics(outputs, labels, {"score": score})
    assert m["acc"] == 0.5  # the neutral segment (score 0, positive under y >= 0) is predicted negative
    assert m["acc_nonzero"] == pytest.approx(2 / 3)  # without it: right, wrong, right
    assert set(m) >= {"loss", "acc", "f1", "acc_nonzero", "f1_nonzero"}
    assert "mae" not in m


def test_sentiment_regression_head_loss_logits_and_metrics():
    task = Sentiment(head="regression")
    task.setup(splits(2, ["score"]))
    assert task.output_dim(2) == 1
    outputs = torch.tensor([[1.5], [-0.5], [0.3], [-2.6]])
    score = torch.tensor([1.0, -1.0, 0.0, -3.0])
    labels = (score >= 0).long()
    loss = task.loss(outputs, labels, {"score": score})
    assert torch.allclose(loss, torch.tensor([0.5, 0.5, 0.3, 0.4]))
    logits = task.class_logits(outputs)
    assert torch.allclose(torch.softmax(logits, 1)[:, 1], torch.sigmoid(outputs[:, 0]))
    m = task.metrics(outputs, labels, {"score": score})
    assert m["mae"] == pytest.approx(0.425)
    assert m["acc"] == 1.0 and m["acc_nonzero"] == 1.0
    assert m["acc7"] == pytest.approx(2 / 4)  # 2 vs 1, -0 vs -1, 0 vs 0, -3 vs -3
    assert m["corr"] == pytest.approx(pearson(outputs[:, 0], score))


def test_sentiment_refuses_a_dataset_without_scores():
    with pytest.raises(ValueError, match="score"):
        Sentiment().setup(splits(2, []))
    with pytest.raises(ValueError, match="2-class"):
        Sentiment().setup(splits(5, ["score"]))


# --- sequence encoders --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [TransformerSequenceEncoder, LSTMSequenceEncoder])
def test_sequence_encoders_ignore_padding(cls):
    torch.manual_seed(0)
    enc = cls(in_dim=5, width=8).eval()
    x = torch.randn(3, 7, 5)
    length = torch.tensor([7, 4, 1])
    out = enc({"x": x, "length": length})
    assert out.shape == (3, 8)
    noisy = x.clone()
    noisy[1, 4:] = 100.0
    noisy[2, 1:] = -50.0
    assert torch.allclose(enc({"x": noisy, "length": length}), out, atol=1e-5)
    # the same as encoding the unpadded sequence alone
    alone = enc({"x": x[1:2, :4], "length": torch.tensor([4])})
    assert torch.allclose(alone, out[1:2], atol=1e-5)


def test_question_encoder_encodes_question_and_choices():
    torch.manual_seed(0)
    enc = QuestionEncoder(vocab_size=20, width=8, embed_dim=6).eval()
    tokens = torch.tensor([[3, 4, 5, 0], [7, 0, 0, 0]])
    choices = torch.randint(2, 20, (2, 4, 3))
    choices[:, :, 2] = 0
    q = {"tokens": tokens, "length": torch.tensor([3, 1]), "choices": choices, "choice_lengths": torch.full((2, 4), 2)}
    out = enc(q)
    assert out.shape == (2, 5, 8)
    assert enc({"tokens": tokens, "length": torch.tensor([3, 1])}).shape == (2, 1, 8)
    # the same question alone, without padding, encodes the same
    assert torch.allclose(enc({"tokens": tokens[1:, :1], "length": torch.tensor([1])})[0, 0], out[1, 0], atol=1e-5)


def test_qa_head_scores_choices_and_zero_out_keeps_the_question():
    torch.manual_seed(0)
    head = QuestionConditionedFusion(
        {"audio": 6, "visual": 5}, num_classes=4, context_dims={"question": 8}, hidden=16
    ).eval()
    feats = {
        "audio": torch.randn(3, 6),
        "visual": torch.randn(3, 5),
        "question": torch.randn(3, 5, 8),
        "qtype": torch.tensor([0, 1, 0]),
    }
    logits = head(feats)
    assert logits.shape == (3, 4)
    z = head.unimodal_logits(feats, "zero_out")
    assert set(z) == {"audio", "visual"} and z["audio"].shape == (3, 4)
    expected = head({**feats, "visual": torch.zeros(3, 5)})
    assert torch.allclose(z["audio"], expected, atol=1e-6)
    vocab = QuestionConditionedFusion(
        {"audio": 6, "visual": 5}, num_classes=9, context_dims={"question": 8}, answer="vocabulary", hidden=16
    )
    assert vocab({**feats, "question": feats["question"][:, :1]}).shape == (3, 9)
    with pytest.raises(ValueError, match="qa_vocabulary"):
        head({**feats, "question": feats["question"][:, :1]})


def test_model_passes_context_and_side_targets_through_and_zero_out_ignores_them():
    torch.manual_seed(0)
    encoders = {"text": LSTMSequenceEncoder(4, 6), "audio": TransformerSequenceEncoder(3, 8, heads=2)}
    head = ConcatFusion({"text": 6, "audio": 8}, 2)
    model = MultimodalModel(encoders, head, passthrough=["score"]).eval()
    assert model.input_keys == ["text", "audio", "score"]
    inputs = {
        "text": {"x": torch.randn(2, 5, 4), "length": torch.tensor([5, 2])},
        "audio": {"x": torch.randn(2, 3, 3), "length": torch.tensor([3, 3])},
        "score": torch.tensor([0.5, -1.0]),
    }
    feats = model.encode(inputs)
    assert torch.equal(feats["score"], inputs["score"])
    natural = head.unimodal_logits(feats, "natural")
    zero = head.unimodal_logits(feats, "zero_out")
    for m in ("text", "audio"):
        assert torch.allclose(natural[m] + sum(natural[o] for o in natural if o != m) * 0, natural[m])
        assert zero[m].shape == (2, 2)
