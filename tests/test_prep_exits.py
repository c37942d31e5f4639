"""Preps exit honestly: nothing found or nothing cached is a non-zero exit naming what was expected where, and the
worker processes end with the prep's main process."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep import avqa, cremad, kinetics_sounds, mosi, ucf101, vggsound
from data_prep.errors import PrepError

import media

REPO = Path(__file__).resolve().parents[1]


def run_main(module, capsys, **options) -> tuple[int, str]:
    """``module.main`` (what ``python -m data_prep.<module>`` runs) -> (exit code, stderr)."""
    code = module.main([f"{k}={v}" for k, v in {"workers": 1, "progress": "false", **options}.items()])
    return code, capsys.readouterr().err


def garbage_cremad(root: Path) -> Path:
    for i, name in enumerate(["1001_DFA_ANG_XX", "1002_IEO_SAD_HI", "1003_TIE_NEU_XX"]):
        for folder, ext in (("VideoFlash", ".flv"), ("AudioWAV", ".wav")):
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / f"{name}{ext}").write_bytes(np.random.default_rng(i).bytes(3000))
    return root


def test_a_folder_of_garbage_files_caches_nothing_and_exits_non_zero(tmp_path, capsys):
    raw = garbage_cremad(tmp_path / "raw")
    code, err = run_main(cremad, capsys, raw_root=raw, out_root=tmp_path / "out")
    assert code == 1
    assert "cremad: none of the 3 clips found could be cached" in err
    assert f"VideoFlash/<clip>.flv and AudioWAV/<clip>.wav files under raw_root={raw}" in err
    assert str(tmp_path / "out" / "index.csv") in err  # every clip's reason is kept there
    assert (tmp_path / "out" / "index.csv").exists()


@pytest.mark.parametrize(
    "module, options, words",
    [
        (cremad, {}, ["cremad: no clip found", "VideoFlash/<clip>.flv"]),
        (kinetics_sounds, {}, ["annotations/train.csv not found", "lists="]),
        (ucf101, {"splits": "{raw}", "flow": "{raw}"}, ["no classInd.txt", "ucfTrainTestlist"]),
    ],
)
def test_an_empty_folder_exits_non_zero_naming_what_was_expected(tmp_path, capsys, module, options, words):
    raw = tmp_path / "empty"
    raw.mkdir()
    code, err = run_main(
        module, capsys, raw_root=raw, out_root=tmp_path / "out", **{k: v.format(raw=raw) for k, v in options.items()}
    )
    assert code == 1 and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "out" / "index.csv").exists()


def test_ucf101_without_videos_names_the_video_layout(tmp_path, capsys):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "classInd.txt").write_text("1 YoYo\n")
    (tmp_path / "raw").mkdir()
    code, err = run_main(ucf101, capsys, raw_root=tmp_path / "raw", splits=tmp_path / "lists", flow=tmp_path)
    assert code == 1 and "ucf101: no clip found" in err and "<Class>/v_<Class>_gXX_cYY.avi" in err


def test_a_missing_raw_folder_is_named(tmp_path, capsys):
    code, err = run_main(cremad, capsys, raw_root=tmp_path / "nowhere")
    assert code == 1 and f"raw_root={tmp_path / 'nowhere'}: no such folder" in err


def test_an_empty_vggsound_csv_exits_non_zero(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    (tmp_path / "vggsound.csv").write_text("")
    code, err = run_main(
        vggsound, capsys, raw_root=tmp_path / "raw", csv=tmp_path / "vggsound.csv", out_root=tmp_path / "out"
    )
    assert code == 1 and "vggsound: no clip found" in err and f"rows in csv={tmp_path / 'vggsound.csv'}" in err
    code, err = run_main(vggsound, capsys, raw_root=tmp_path / "raw", csv=tmp_path / "absent.csv")
    assert code == 1 and "absent.csv: no such file" in err


def test_vggsound_csv_rows_without_files_cache_nothing_and_exit_non_zero(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    media.write_csv(tmp_path / "vggsound.csv", [("abcdefghijk", 30, "dog barking", "train")])
    code, err = run_main(
        vggsound, capsys, raw_root=tmp_path / "raw", csv=tmp_path / "vggsound.csv", out_root=tmp_path / "out"
    )
    assert code == 1 and "none of the 1 clips found could be cached (missing 1" in err
    assert "<ytid>_<start:06d>.mp4" in err


def test_a_mosi_pickle_without_usable_segments_exits_non_zero(tmp_path, capsys):
    split = {
        "text": np.zeros((2, 4, 3)),
        "audio": np.zeros((2, 4, 2)),
        "vision": np.zeros((2, 4, 2)),
        "labels": np.full((2, 1, 1), np.nan),
    }
    pkl = tmp_path / "m.pkl"
    pkl.write_bytes(pickle.dumps({"train": split, "valid": split, "test": split}))
    code = mosi.main([f"pkl={pkl}", f"out_root={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 1 and "no segment with a finite score" in err and "'train', 'valid', 'test'" in err
    assert not (tmp_path / "out" / "recipe.json").exists()


def test_avqa_annotations_without_questions_exit_non_zero(tmp_path, capsys):
    (tmp_path / "ann").mkdir()
    for name in ("train_qa.json", "val_qa.json"):
        (tmp_path / "ann" / name).write_text("[]")
    (tmp_path / "media").mkdir()
    code = avqa.main(
        [f"ann={tmp_path / 'ann'}", f"media={tmp_path / 'media'}", f"out_root={tmp_path / 'out'}", "progress=false"]
    )
    err = capsys.readouterr().err
    assert code == 1 and "no usable train question" in err and "train_qa.json" in err and "video_name" in err


def test_library_code_raises_instead_of_exiting(tmp_path):
    with pytest.raises(PrepError, match="no clip found"):
        media.prep(cremad, raw_root=tmp_path)


def test_usage_mistakes_exit_2_and_help_exits_0(capsys):
    assert cremad.main(["raw_root=/r", "wrkers=2"]) == 2
    assert "unknown option 'wrkers'" in capsys.readouterr().err
    assert cremad.main(["--help"]) == 0


# --- the pool ends with the main process -------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_workers_exit_when_the_main_process_is_killed(tmp_path, how):
    raw = media.make_cremad(tmp_path / "raw", per_emotion=4)  # work for several seconds
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "data_prep.cremad",
            f"raw_root={raw['raw']}",
            f"out_root={tmp_path / 'out'}",
            "workers=2",
            "progress=false",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    workers: list[int] = []
    try:
        deadline = time.time() + 60
        while len(workers) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            workers = _children(proc.pid)
        assert len(workers) == 2, (
            f"the prep's pool did not start: {proc.poll()} {proc.stderr.read()[-2000:] if proc.poll() is not None else ''}"
        )
        time.sleep(1.0)  # the workers are importing torch or decoding clips
        proc.send_signal(how)
        proc.wait(timeout=30)
        deadline = time.time() + 3  # without the parent check they go on for longer (queued clips, blocked writes)
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "workers outlived the prep's main process"
        if how == signal.SIGTERM:  # stopped in order: the finished clips are in the journal, the exit code says why
            assert proc.returncode == 128 + signal.SIGTERM
            assert b"run the same command again to resume" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in workers:  # only if the test failed: leave no stray process behind
            if _alive(w):
                os.kill(w, signal.SIGKILL)
