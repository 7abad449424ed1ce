"""The real-speech recipe: corpora read and normalized, whole speakers held out,
real and synthesized speech mixed in training, scored per corpus, and the LM's
real text without any held-out speaker's sentence."""

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from apps.asr.corpora import CORPORA, hold_out, normalize_transcript, prepare, read_corpus
from apps.asr.lm import SHARED

ROOT = Path(__file__).resolve().parents[1]

needs_speech = pytest.mark.skipif(
    not all((SHARED / "speech" / c.name / "transcripts.tsv").is_file() for c in CORPORA),
    reason="needs ../shared/data/speech's corpora",
)


def _fake_corpora(root: Path, speakers: int = 6, per_speaker: int = 2) -> Path:
    """A shared data folder with every corpus of CORPORA: tiny Ogg Opus clips of
    noise, a transcript per clip, and a train/test split where the corpus has one."""
    rng = np.random.default_rng(0)
    for corpus in CORPORA:
        folder = root / "speech" / corpus.name
        folder.mkdir(parents=True)
        lines, split = [], []
        held = corpus.dev_speakers + corpus.test_speakers
        # Where only the test side is held out, half the speakers are on it.
        for s in range(speakers + (2 if corpus.from_test_split else 1) * held):
            for u in range(per_speaker):
                uid = f"{corpus.name[:3]}-{s}-{u}"
                wave = (0.05 * rng.standard_normal(8000 + 800 * u)).astype("float32")
                sf.write(folder / f"{uid}.opus", wave, 16000, format="OGG", subtype="OPUS")
                lines.append(f"{uid}\tspk{s}\tSay {s + u} times, \u2019twas fine!")
                split.append(f"{uid}\t{'test' if s % 2 else 'train'}")
        (folder / "transcripts.tsv").write_text("\n".join(lines) + "\n")
        if corpus.from_test_split:
            (folder / "split.tsv").write_text("\n".join(split) + "\n")
    return root


def test_transcripts_are_normalized_to_the_models_vocabulary():
    assert normalize_transcript("Then whose is it?") == "then whose is it"
    assert normalize_transcript("She couldn\u2019t decide, at 10.") == "she couldn't decide at ten"
    assert normalize_transcript("x i sixty one") == "x i sixty one"  # AN4's spelled letters


def test_whole_speakers_are_held_out_per_corpus(tmp_path):
    data = _fake_corpora(tmp_path / "data")
    summary = prepare(data, tmp_path / "out", seed=0)
    rows = {s: [json.loads(x) for x in (tmp_path / "out" / f"real_{s}.jsonl").read_text()
                .splitlines()] for s in ("train", "dev", "test")}  # fmt: skip
    speakers = {s: {r["speaker"] for r in rs} for s, rs in rows.items()}
    assert not speakers["train"] & speakers["dev"] and not speakers["train"] & speakers["test"]
    assert not speakers["dev"] & speakers["test"]
    for corpus in CORPORA:
        held = summary["held_out"][corpus.name]
        assert len(held["dev"]) == corpus.dev_speakers
        assert len(held["test"]) == corpus.test_speakers
        named = {f"{corpus.name}/{s}" for s in held["dev"] + held["test"]}
        assert named == {r["speaker"] for s in ("dev", "test") for r in rows[s]
                         if r["corpus"] == corpus.name}  # fmt: skip
        if corpus.from_test_split:  # odd speakers are the corpus's own test side
            assert all(int(s[3:]) % 2 for s in held["dev"] + held["test"])
    row = rows["train"][0]
    assert row["text"].startswith("say ") and row["text"].endswith(" times twas fine")
    assert row["duration"] == pytest.approx(0.5, abs=0.02)
    assert Path(row["path"]).is_file() and row["split"] == "train"
    # Seeded: the same speakers again; another seed draws others.
    again = prepare(data, tmp_path / "again", seed=0)
    assert again["held_out"] == summary["held_out"]
    other = prepare(data, tmp_path / "other", seed=1)
    assert other["held_out"] != summary["held_out"]


def test_a_missing_corpus_or_too_few_speakers_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="librispeech-train-clean-5 is missing"):
        prepare(tmp_path, tmp_path / "out")
    data = _fake_corpora(tmp_path / "data", speakers=0)
    an4 = next(c for c in CORPORA if c.name == "an4")
    (data / "speech" / "an4" / "split.tsv").write_text("")  # every speaker on the train side
    with pytest.raises(ValueError, match="an4: 9 held-out speakers asked, 0 available"):
        hold_out(an4, read_corpus(data / "speech" / "an4"), seed=0)


@needs_speech
def test_the_shared_corpora_hold_out_speakers_from_their_test_sides(tmp_path):
    summary = prepare(SHARED, tmp_path, seed=0)
    for corpus in CORPORA:
        rows = read_corpus(SHARED / "speech" / corpus.name)
        held = summary["held_out"][corpus.name]
        side = {r["speaker"]: r["own_split"] for r in rows}
        if corpus.from_test_split:
            assert {side[s] for s in held["dev"] + held["test"]} == {"test"}
    train = [json.loads(x) for x in (tmp_path / "real_train.jsonl").read_text().splitlines()]
    letters = Counter(ch for r in train for ch in r["text"])
    assert set(letters) <= set("abcdefghijklmnopqrstuvwxyz' ")
    assert sum(r["duration"] for r in train) / 3600 > 10  # most of the 13.5 hours train
    assert not any("lj001" in r["path"] for r in train)


def _rows(n: int, **extra) -> list[dict]:
    return [{"duration": 1.0, "path": f"x{i}.flac", "text": "a", **extra} for i in range(n)]


def test_the_real_weight_sets_how_often_real_utterances_come():
    from apps.asr.train import epoch_indices, row_weight

    synthetic, real = _rows(40, release=1), _rows(40, corpus="an4")
    assert row_weight(real[0], (0.5,), 2.0) == 2.0
    assert row_weight(synthetic[0], (0.5,), 2.0) == 0.5
    rows = synthetic + real
    picked = Counter(i % len(rows) for i in epoch_indices(rows, (), 0, 0, real_weight=2.5))
    assert all(picked[i] == 1 for i in range(40))
    assert {picked[i] for i in range(40, 80)} == {2, 3}  # 2.5: twice, and half a third time
    assert 10 <= sum(picked[i] == 3 for i in range(40, 80)) <= 30


def test_training_mixes_real_speech_and_validates_on_the_real_dev_speakers(tmp_path):
    from apps.asr.train import spread, training_sets

    args = argparse.Namespace(data=tmp_path, no_real=False, valid=None)
    with pytest.raises(SystemExit, match="no training data"):
        training_sets(args)
    for name, rows in (
        ("train", _rows(3, release=1)),
        ("real_train", _rows(2, corpus="an4")),
        ("valid", _rows(1, release=1)),
        ("real_dev", _rows(4, corpus="an4")),
    ):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, valid, name = training_sets(args)
    assert len(train) == 5 and len(valid) == 4 and name == "real_dev.jsonl"
    train, valid, name = training_sets(argparse.Namespace(data=tmp_path, no_real=True,
                                                          valid="valid.jsonl"))  # fmt: skip
    assert len(train) == 3 and len(valid) == 1 and name == "valid.jsonl"
    assert [r["path"] for r in spread(_rows(10), 3)] == ["x0.flac", "x3.flac", "x6.flac"]


def test_scores_per_corpus_and_the_telephone_path():
    from apps.asr.evaluate import score_groups, telephone_rate

    def logp(text: str) -> np.ndarray:  # one frame per character, each sure
        from apps.asr.train import encode

        out = np.full((2 * len(text), 29), -20.0, dtype=np.float32)
        for t, tok in enumerate(encode(text)):
            out[2 * t, tok], out[2 * t + 1, 0] = 0.0, 0.0
        return out

    rows = [{"text": "a b", "corpus": "an4"}, {"text": "c d", "corpus": "cv"}]
    report = score_groups(rows, [logp("a b"), logp("c x")], "corpus", None)
    assert report["an4"]["wer_greedy"] == 0.0 and report["cv"]["wer_greedy"] == 0.5
    assert report["all"]["wer_greedy"] == 0.25 and report["all"]["n"] == 2
    t = np.arange(16000) / 16000
    low, high = np.sin(2 * np.pi * 1000 * t), np.sin(2 * np.pi * 6000 * t)
    assert telephone_rate(low.astype("float32")).shape == (16000,)
    assert np.std(telephone_rate(low.astype("float32"))[1000:-1000]) > 0.6
    assert np.std(telephone_rate(high.astype("float32"))[1000:-1000]) < 0.01  # above 4 kHz


def test_per_corpus_scores_decode_each_utterance_once_and_match_each_corpus_alone():
    from apps.asr.evaluate import score, score_groups, transcripts
    from dsstream.decoding import CTCDecoder

    decoder = CTCDecoder(beam_width=8, language_model=ROOT / "samples/asr/lm.bin")
    batches = []
    real_decode = decoder.decode_batch
    decoder.decode_batch = lambda mats: batches.append(len(mats)) or real_decode(mats)  # type: ignore[method-assign]
    rng = np.random.default_rng(0)
    rows = [{"text": t, "corpus": c} for t, c in (("the cat", "a"), ("a dog", "b"), ("sat", "a"))]
    mats = [np.log(rng.dirichlet(np.ones(29), size=n)).astype(np.float32) for n in (30, 24, 18)]
    report = score_groups(rows, mats, "corpus", decoder)
    assert batches == [3]  # one beam search over the set, not one more per corpus
    for name, idx in (("a", [0, 2]), ("b", [1])):
        alone = score([rows[i]["text"] for i in idx], transcripts([mats[i] for i in idx], decoder))
        assert report[name] == alone
    assert report["all"]["n"] == 3 and set(report["all"]) >= {"wer_lm", "cer_greedy"}


def test_the_lms_real_text_leaves_out_held_out_speakers_and_lj001(tmp_path):
    from apps.asr.lm import real_training_text

    (tmp_path / "speech" / "lj001").mkdir(parents=True)
    (tmp_path / "speech" / "lj001" / "transcripts.tsv").write_text("LJ001-0001\tZebras, run!\n")
    for name, texts in (("train", ["we call it bear", "zebras run", "go home"]),
                        ("dev", ["go home"]), ("test", [])):  # fmt: skip
        rows = [{"text": t, "corpus": "x"} for t in texts]
        (tmp_path / f"real_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert real_training_text(tmp_path, tmp_path) == ["we call it bear"]
    (tmp_path / "real_train.jsonl").unlink()
    with pytest.raises(SystemExit, match="apps.asr.corpora writes it"):
        real_training_text(tmp_path, tmp_path)
