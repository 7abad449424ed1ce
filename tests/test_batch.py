"""Batch transcription (dsstream.batch, dsstream transcribe-batch): inputs, the
resumable ledger, error records, and records equal to the in-process
transcriber's whether one process or a pool does the work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_asr_e2e import CARD_WER, CLIPS, REFS

from dsstream.batch import (
    BatchConfig,
    Output,
    Recognizer,
    _run_pool,
    collect_inputs,
    common_root,
    pending,
    read_ledger,
    run_local,
)
from dsstream.captions import to_srt, to_vtt
from dsstream.evaluation import wer
from dsstream.local import transcribe


def _corpus(root: Path) -> dict[str, Path]:
    """The shipped clips in a tree (one in a subfolder, one as 8 kHz stereo WAV),
    plus files that must fail each their own way."""
    (root / "sub").mkdir(parents=True)
    files = {
        "lj": shutil.copy(CLIPS / "LJ001-0011.flac", root / "LJ001-0011.flac"),
        "david": shutil.copy(CLIPS / "heldout-espeak-david.flac", root / "sub" / "david.flac"),
    }
    audio, rate = sf.read(CLIPS / "LJ001-0011.flac", dtype="float32")
    stereo = np.stack([audio[::2], audio[::2] * 0.5], axis=1)  # crude 8 kHz, two channels
    sf.write(root / "sub" / "lj-8k-stereo.wav", stereo, rate // 2)
    files["stereo"] = root / "sub" / "lj-8k-stereo.wav"
    (root / "junk.wav").write_bytes(b"RIFF not really a wave file")
    files["junk"] = root / "junk.wav"
    sf.write(root / "silent-empty.wav", np.zeros(0, dtype=np.float32), 16000)
    files["empty"] = root / "silent-empty.wav"
    (root / "notes.txt.bak").write_text("not audio, not searched")
    return {k: Path(v).resolve() for k, v in files.items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def recognizer():
    return Recognizer(BatchConfig(captions=("srt", "vtt")))


# -- inputs and ledger ---------------------------------------------------------------


def test_inputs_from_folders_globs_and_manifests(corpus, tmp_path):
    root = corpus["lj"].parent
    assert collect_inputs([root]) == sorted(
        [corpus[k] for k in ("lj", "david", "stereo", "junk", "empty")]
    )
    assert collect_inputs([f"{root}/sub/*.flac"]) == [corpus["david"]]
    manifest = tmp_path / "list.txt"
    rel = os.path.relpath(corpus["david"], tmp_path)
    manifest.write_text(f"# a comment\n\n{corpus['lj']}\n{rel}\textra column\n")
    assert collect_inputs([manifest]) == [corpus["lj"], corpus["david"]]
    # Each file once, in the order first named.
    assert collect_inputs([corpus["david"], root / "sub", manifest]) == [
        corpus["david"], corpus["stereo"], corpus["lj"],
    ]  # fmt: skip


@pytest.mark.parametrize(
    "bad, message",
    [("nowhere/missing.flac", "no such file"), ("nowhere/*.flac", "matches no file")],
)
def test_inputs_that_name_nothing_are_refused(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        collect_inputs([tmp_path / bad])
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(ValueError, match="no audio files"):
        collect_inputs([tmp_path / "empty-dir"])
    (tmp_path / "empty.lst").write_text("# nothing\n")
    with pytest.raises(ValueError, match="lists no file"):
        collect_inputs([tmp_path / "empty.lst"])


def test_ledger_last_record_wins_and_a_cut_line_is_dropped(tmp_path):
    ledger = tmp_path / "transcripts.jsonl"
    lines = [
        {"path": "/a.wav", "error": {"code": "failed", "message": "x"}},
        {"path": "/b.wav", "error": None, "text": "b"},
        {"path": "/a.wav", "error": None, "text": "a"},
    ]
    ledger.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"path": "/c.wa')
    records = read_ledger(ledger)
    assert records == {"/a.wav": lines[2], "/b.wav": lines[1]}
    paths = [Path("/a.wav"), Path("/b.wav"), Path("/c.wav")]
    assert pending(paths, records) == [Path("/c.wav")]
    records["/b.wav"] = lines[0] | {"path": "/b.wav"}
    assert pending(paths, records, retry_errors=True) == [Path("/b.wav"), Path("/c.wav")]
    with Output(tmp_path):  # opening for append drops the cut line
        pass
    assert ledger.read_text().endswith("}\n") and '"/c.wa' not in ledger.read_text()


# -- records -------------------------------------------------------------------------


def test_records_equal_the_in_process_transcriber(corpus, recognizer):
    for key, name in (("lj", "LJ001-0011.flac"), ("david", "heldout-espeak-david.flac")):
        result = recognizer.file(corpus[key])
        reference = transcribe(corpus[key])
        record = result.record
        assert record["error"] is None and record["model"] == "sample-asr"
        assert record["text"] == reference.text
        assert wer([REFS[name]], [record["text"]]) <= CARD_WER[name] + 1e-9
        assert record["duration"] == pytest.approx(sf.info(corpus[key]).duration, abs=1e-3)
        words = [w for seg in record["segments"] for w in seg["words"]]
        assert [w["word"] for w in words] == record["text"].split()
        assert all(0 <= w["start"] <= w["end"] <= record["duration"] + 0.05 for w in words)
        assert result.captions == {"srt": to_srt(reference.segments),
                                   "vtt": to_vtt(reference.segments)}  # fmt: skip
    # Any rate, several channels: resampled and averaged as the transcriber does.
    stereo = recognizer.file(corpus["stereo"]).record
    assert stereo["error"] is None and stereo["text"] == transcribe(corpus["stereo"]).text
    assert wer([REFS["LJ001-0011.flac"]], [stereo["text"]]) < 0.5


def test_files_that_fail_get_coded_records(corpus, recognizer, tmp_path):
    codes = {key: recognizer.file(corpus[key]).record["error"]["code"] for key in ("junk", "empty")}
    assert codes == {"junk": "unreadable", "empty": "empty"}
    gone = recognizer.file(tmp_path / "gone.flac").record
    assert gone["error"]["code"] == "not_found" and gone["text"] is None
    short = Recognizer(BatchConfig(max_seconds=2.0)).file(corpus["lj"]).record
    assert (
        short["error"]["code"] == "too_long"
        and "over the limit of 2 s" in short["error"]["message"]
    )
    split = Recognizer(BatchConfig(options={"split_channels": True}))
    assert split.file(corpus["lj"]).record["error"]["code"] == "bad_audio"
    both = split.file(corpus["stereo"]).record
    assert both["error"] is None and {s["channel"] for s in both["segments"]} == {0, 1}


# -- runs ----------------------------------------------------------------------------


def _sorted_lines(ledger: Path) -> list[str]:
    return sorted(ledger.read_text().splitlines())


def test_a_run_resumes_and_a_pool_writes_the_same_records(corpus, tmp_path):
    paths = collect_inputs([corpus["lj"].parent])
    config = BatchConfig(captions=("srt",))
    seen = []
    with Output(tmp_path / "one", common_root(paths)) as out:
        summary = run_local(paths, out, config, jobs=1, report=lambda r, s: seen.append(s.files))
    assert (summary.files, summary.failed) == (5, 2) and seen == [1, 2, 3, 4, 5]
    assert summary.audio_seconds == pytest.approx(2 * 4.512 + 3.887, abs=0.01)
    one = tmp_path / "one" / "transcripts.jsonl"
    assert (tmp_path / "one" / "captions" / "sub" / "david.srt").is_file()
    assert not (tmp_path / "one" / "captions" / "junk.srt").exists()

    # Cut the ledger inside its third record, as a crash would: the rerun
    # keeps the two whole records and does the three others.
    lines = one.read_text().splitlines(keepends=True)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "transcripts.jsonl").write_text("".join(lines[:2]) + lines[2][:40])
    with Output(resumed, common_root(paths)) as out:
        todo = pending(paths, out.done())
        assert len(todo) == 3
        run_local(todo, out, config, jobs=1)
    assert _sorted_lines(resumed / "transcripts.jsonl") == _sorted_lines(one)

    with Output(tmp_path / "pool", common_root(paths)) as out:
        summary = run_local(paths, out, config, jobs=2)
    assert summary.files == 5
    assert _sorted_lines(tmp_path / "pool" / "transcripts.jsonl") == _sorted_lines(one)


def crash_on_david(path: str) -> str:
    """A pool worker that dies on one file (run in the pool's child processes)."""
    if path.endswith("david.flac"):
        os._exit(3)
    from dsstream import batch

    return batch._work(path)


def test_a_worker_that_dies_is_replaced_and_its_file_recorded(corpus, tmp_path):
    paths = [corpus["david"], corpus["lj"]]
    results = []
    recognizer = Recognizer(BatchConfig())
    _run_pool(paths, recognizer, 1, results.append, work=crash_on_david)
    by_path = {Path(r.record["path"]).name: r.record for r in results}
    assert sorted(by_path) == ["LJ001-0011.flac", "david.flac"]
    assert by_path["david.flac"]["error"]["code"] == "crashed"
    assert by_path["LJ001-0011.flac"]["text"] == transcribe(corpus["lj"]).text


def test_cli_transcribe_batch(corpus, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dsstream.cli", "transcribe-batch", "--no-progress", "--vtt"]
    run = subprocess.run(
        [*cmd, str(corpus["lj"]), str(corpus["junk"]), "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr  # a file failed
    assert (
        "error: unreadable" in run.stderr and "2 files done (1 failed), 0 done before" in run.stderr
    )
    records = read_ledger(out / "transcripts.jsonl")
    # Captions asked for: punctuated, the JSON text too (as --punctuate would).
    assert records[str(corpus["lj"])]["text"] == transcribe(corpus["lj"], punctuate=True).text
    assert (out / "captions" / "LJ001-0011.vtt").read_text().startswith("WEBVTT\n\n00:")
    again = subprocess.run(
        [*cmd, str(corpus["lj"]), "-o", str(out)], capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0 and "0 files done (0 failed), 1 done before" in again.stderr
    assert len((out / "transcripts.jsonl").read_text().splitlines()) == 2
    bad = subprocess.run([*cmd, str(tmp_path / "nothing"), "-o", str(out)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "no such file or folder" in bad.stderr
