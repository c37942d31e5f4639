"""UCF-101 end to end on generated media: AVI videos, TV-L1 flow JPEG folders, official split files, fold change."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from data_prep import ucf101
from data_prep.media import decode_container
from data_prep.synthetic import write_video
from onthefly.config import compose
from onthefly.data.cache import CacheMismatchError, CacheReader, read_index
from onthefly.data.clips import decode_frames
from onthefly.data.ucf101 import UCF101

import media


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return media.make_ucf101(tmp_path_factory.mktemp("ucf_raw"))


def _prep(raw, out, **extra):
    return media.prep(ucf101, raw_root=raw["raw"], splits=raw["lists"], flow=raw["flow"], out_root=out, **extra)


@pytest.fixture(scope="module")
def built(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("ucf_cache")
    return out, _prep(raw, out)


def test_official_lists_with_the_handstand_case_quirk(raw, built):
    out, summary = built
    index = read_index(out / "index.csv").set_index("id")
    for vid, (label, split) in raw["clips"].items():
        assert (index.loc[vid, "label"], index.loc[vid, "split"], index.loc[vid, "status"]) == (label, split, "ok")
    assert index.loc["v_HandStandPushups_g08_c01", "source"] == "HandstandPushups/v_HandStandPushups_g08_c01.avi"
    for vid, status in raw["bad"].items():
        assert index.loc[vid, "status"] == status
    assert "trainlist01.txt" in index.loc["v_YoYo_g03_c01", "reason"]
    assert "flow" in index.loc["v_YoYo_g04_c01", "reason"]
    assert CacheReader(out, "ucf101").classes == media.UCF_CLASSES  # classInd order
    assert summary["skipped"] == {"missing": 2}


def test_flow_is_stored_at_the_rgb_frame_times(raw, built):
    out, _ = built
    reader = CacheReader(out, "ucf101")
    assert reader.streams == ["visual", "flow_u", "flow_v"]
    row = reader.ok_rows().iloc[0]
    assert row.n_frames == 2
    for t, centre in enumerate((0.5, 1.5)):
        k = int(centre * raw["fps"]) + 1  # the flow frame starting at video frame floor(t * fps)
        u, v = (decode_frames([reader.jpeg(row.frame_start + 3 * t + s)], gray=True).float().mean() for s in (1, 2))
        assert abs(u - 10 * k) < 3 and abs(v - (250 - 10 * k)) < 3


def test_reader_returns_rgb_and_two_channel_flow_at_matching_times(built):
    out, _ = built
    splits = UCF101(root=str(out), image_size=32).splits()
    assert splits.num_classes == 3 and splits.modalities == ["visual", "flow"]
    item = splits.test[0]
    assert item["visual"].shape == (3, 3, 32, 32) and item["flow"].shape == (3, 2, 32, 32)
    # eval frames 0, 1, 1 of a 2-frame clip: the flow of frames 2 and 3 equals, of frame 1 differs
    assert torch.equal(item["flow"][1], item["flow"][2]) and not torch.equal(item["flow"][0], item["flow"][1])


def test_another_fold_is_refused_until_reindexed_without_decoding(raw, built, tmp_path):
    out, _ = built
    with pytest.raises(CacheMismatchError, match="FOLD=2"):
        UCF101(root=str(out), fold=2).splits()
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(out, copy)
    summary = _prep(raw, copy, fold=2)
    assert summary["processed_now"] == 0  # the same clips, only their split changes
    index = read_index(copy / "index.csv").set_index("id")
    assert index.loc["v_YoYo_g08_c01", "split"] == "train" and index.loc["v_YoYo_g01_c01", "split"] == "test"
    assert len(UCF101(root=str(copy), fold=2).splits().test) == 6


def test_ucf101_brings_a_two_channel_flow_encoder_at_the_backbones_width():
    cfg = compose(["dataset=ucf101", "backbone=resnet18"])
    flow = OmegaConf.to_container(cfg.backbone.encoders.flow, resolve=True)
    assert flow["in_channels"] == 2 and flow["width"] == 64 and "visual" in cfg.backbone.encoders
    assert compose(["dataset=ucf101", "backbone=resnet18_small"]).backbone.encoders.flow.width == 8


@pytest.fixture(scope="module")
def built_diff(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("ucf_cache_diff")
    return out, _prep(raw, out, rgb_diff="true")


def test_rgb_difference_option_stores_each_frames_successor(raw, built, built_diff, tmp_path):
    out, _ = built_diff
    reader = CacheReader(out, "ucf101")
    assert reader.streams == ["visual", "flow_u", "flow_v", "visual_next"] and reader.recipe["rgb_diff"] is True
    # a scene panning one pixel per frame: the successor is the frame moved one pixel left
    video = write_video(tmp_path / "pan.avi", 2.0, size=(96, 64), fps=10, audio_freq=None, textured=True)
    decoded = decode_container(video, with_next=True)
    cur, nxt = (torch.from_numpy(np.stack(x)).float() for x in (decoded.frames, decoded.next_frames))
    assert (nxt[..., :-1, :] - cur[..., 1:, :]).abs().mean() < (nxt - cur).abs().mean() / 2  # [T, H, W, 3]
    splits = UCF101(root=str(out), image_size=32, modalities=["visual", "flow", "rgb_diff"]).splits()
    item = splits.test[0]
    assert item["rgb_diff"].shape == (3, 3, 32, 32) and item["flow"].shape == (3, 2, 32, 32)
    assert item["rgb_diff"].abs().max() < 0.5  # flat-colour test clips: the next frame is the same colour
    with pytest.raises(CacheMismatchError, match="rgb_diff=true"):
        UCF101(root=str(built[0]), modalities=["visual", "flow", "rgb_diff"]).splits()


@pytest.mark.slow
def test_three_modality_variant_trains(built_diff, tmp_path):
    out, _ = built_diff
    results = media.train_once(
        "ucf101", out, tmp_path / "run", "dataset.modalities=[visual,flow,rgb_diff]", "modulation=ogm_ge"
    )
    assert results["status"] == "ok" and results["modalities"] == ["visual", "flow", "rgb_diff"]


@pytest.mark.slow
def test_one_epoch_trains_on_the_prepared_cache(built, tmp_path):
    out, _ = built
    results = media.train_once("ucf101", out, tmp_path / "run", "modulation=ogm_ge")
    assert results["status"] == "ok" and results["num_classes"] == 3
    assert results["modalities"] == ["visual", "flow"] and np.isfinite(results["test"]["loss"])
