"""The ASR data recipe: sentence selection, voice hold-out, deterministic plans,
and a tiny real synthesis run when the synthesizers are installed."""

import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from apps.asr.lm import SHARED, evaluation_sentences
from apps.asr.prepare import (
    _render,
    main,
    plan,
    plan_releases,
    rendered_text,
    select_sentences,
    sentence_count,
)
from apps.asr.voices import Voice, catalogue, split_voices

needs_shared = pytest.mark.skipif(not (SHARED / "text").is_dir(), reason="needs ../shared/data")


@needs_shared
def test_sentences_exclude_evaluation_speech_and_fit_the_vocabulary():
    sentences = select_sentences(SHARED, 2000, seed=0)
    assert len(sentences) == len(set(sentences)) == 2000
    assert not set(sentences) & evaluation_sentences(SHARED)
    assert all(set(s) <= set("abcdefghijklmnopqrstuvwxyz' ") for s in sentences)
    assert all(3 <= len(s.split()) <= 24 for s in sentences)
    assert select_sentences(SHARED, 50, seed=0) == sentences[:50]  # seeded


def test_whole_voices_are_held_out():
    voices = [Voice("espeak-ng", f"en-us+m{i}", r, 50) for i in range(20) for r in (0.9, 1.1)]
    voices += [Voice("flite", n, 1.0, 50) for n in ("kal", "awb", "rms", "slt")]
    train, valid = split_voices(voices, held_out=0.25, seed=1)
    assert train.isdisjoint(valid) and train | valid == {v.speaker for v in voices}
    assert {s.split("-")[0] for s in valid} == {"espeak", "flite"}  # some of each engine
    assert split_voices(voices, held_out=0.25, seed=1) == (train, valid)


def test_a_later_release_keeps_the_earlier_split_and_sentences():
    first = [Voice("espeak-ng", f"en-us+m{i}", 1.0, 50) for i in range(20)]
    first += [Voice("festival", "kal_diphone")]
    second = [Voice("festival", n, release=2) for n in ("ked_diphone", "rab_diphone", "us1")]
    second += [Voice("pico", n, release=2) for n in ("en-US", "en-GB")]
    before = split_voices(first, seed=4)
    train, valid = split_voices(first + second, seed=4)
    assert valid & {v.speaker for v in first} == before[1]  # release 1 unmoved
    assert train & {v.speaker for v in first} == before[0]
    assert "festival-kal_diphone" in train  # a lone release-1 voice still trains
    assert {s.split("-")[0] for s in valid - before[1]} == {"festival", "pico"}
    sentences = [f"s {i}" for i in range(sentence_count(0.02) + sentence_count(0.01))]
    jobs = plan_releases(sentences, ["q"], first + second, [0.02, 0.01], seed=1)
    alone = plan_releases(sentences, ["q"], first + second, [0.02], seed=1)
    assert jobs[: len(alone)] == alone  # adding release 2 leaves release 1's jobs as they were
    ids = [u for u, _, _ in jobs]
    assert len(set(ids)) == len(ids) == sentence_count(0.02) + sentence_count(0.01) + 2
    texts = [t for _, t, _ in jobs if t != "q"]
    assert len(set(texts)) == len(texts)  # no sentence spoken twice
    assert {v.release for _, t, v in jobs[len(alone) :]} == {2}


def test_plan_is_deterministic_and_draws_engines_evenly():
    voices = [Voice("espeak-ng", f"en-us+m{i}") for i in range(50)] + [Voice("flite", "slt")]
    jobs = plan([f"s {i}" for i in range(400)], voices, seed=3)
    assert jobs == plan([f"s {i}" for i in range(400)], voices, seed=3)
    flite = sum(v.engine == "flite" for _, _, v in jobs)
    assert 150 < flite < 250  # about half, although flite has 1 voice of 51


def test_voice_commands():
    v = Voice("espeak-ng", "en-gb+f3", 1.2, 40)
    assert v.command("hi there", Path("o.wav")) == [
        "espeak-ng",
        "-v",
        "en-gb+f3",
        "-s",
        "198",
        "-p",
        "40",
        "-w",
        "o.wav",
        "hi there",
    ]
    assert "duration_stretch=0.833" in Voice("flite", "slt", 1.2).command("x", Path("o"))
    rh = Voice("rhvoice", "slt", 0.9, 40, release=2).command("x", Path("o.wav"))
    assert rh == ["RHVoice-test", "-p", "slt", "-r", "90", "-t", "80", "-o", "o.wav"]
    pico = Voice("pico", "en-GB", 1.1, 50, release=2).command("hello", Path("o.wav"))
    assert pico[:4] == ["pico2wave", "-l", "en-GB", "-w"]
    assert pico[-1] == "<speed level='110'><pitch level='100'>hello</pitch></speed>"
    # An MBROLA database speaks English through espeak-ng's mb-<db>-en voice.
    mb = Voice("mbrola", "de3", 0.9, 30, release=3).command("hi", Path("o.wav"))
    assert mb == ["espeak-ng", "-v", "mb-de3-en", "-s", "148", "-p", "30", "-w", "o.wav", "hi"]


def test_installing_a_later_release_leaves_earlier_voices_unchanged(monkeypatch):
    import apps.asr.voices as voices

    monkeypatch.setattr(voices, "_festival_voice_installed", lambda name: True)
    monkeypatch.setattr(voices, "_mbrola_voice_installed", lambda name: name != "gr2")
    engines = ["espeak-ng", "flite", "festival", "rhvoice", "pico"]
    monkeypatch.setattr(voices, "available_engines", lambda: engines)
    before = voices.catalogue(seed=2)
    monkeypatch.setattr(voices, "available_engines", lambda: engines + ["mbrola"])
    after = voices.catalogue(seed=2)
    assert after[: len(before)] == before  # same voices, same rate and pitch draws
    added = after[len(before) :]
    assert {v.release for v in added} == {3, 4} and {v.engine for v in added} == {"mbrola"}
    mbrola = set(voices.MBROLA_VOICES + voices.MBROLA_VOICES_4)
    assert {v.name for v in added} == mbrola - {"gr2"}  # the installed databases
    assert len(added) == 12 * len({v.name for v in added})  # natural voices: 12 settings each
    train, valid = voices.split_voices(after, seed=0)
    for release in (3, 4):  # one whole new voice held out per release
        assert len(valid & {v.speaker for v in added if v.release == release}) == 1
    # Installing release 4's databases later leaves release 3's voices and split alone.
    release3 = set(voices.MBROLA_VOICES) - {"gr2"}
    monkeypatch.setattr(voices, "_mbrola_voice_installed", lambda name: name in release3)
    only3 = voices.catalogue(seed=2)
    assert after[: len(only3)] == only3 and {v.release for v in only3[len(before) :]} == {3}
    assert voices.split_voices(only3, seed=0)[1] <= valid


@pytest.mark.parametrize(
    "voice",
    [
        Voice("rhvoice", "slt", 1.1, 60, 2),
        Voice("pico", "en-US", 0.9, 40, 2),
        Voice("festival", "us1_mbrola", 1.0, 50, 2),
        Voice("mbrola", "de1", 1.1, 60, 3),
    ],  # fmt: skip
    ids=lambda v: v.engine,
)
def test_natural_voice_engines_speak(voice, tmp_path):
    from apps.asr.voices import available_engines

    if voice.engine not in available_engines() or (
        voice.engine in ("festival", "mbrola")
        and not any(v.name == voice.name for v in catalogue())
    ):
        pytest.skip(f"{voice.engine} {voice.name} is not installed")
    from apps.asr.voices import synthesize

    synthesize(voice, "the letter used should be fine in form", tmp_path / "x.wav")
    audio, rate = sf.read(str(tmp_path / "x.wav"))
    assert 1.0 < len(audio) / rate < 6.0 and abs(audio).max() > 0.05


def test_a_missing_synthesizer_names_its_package(tmp_path, monkeypatch):
    from apps.asr.voices import SynthesisError, synthesize

    monkeypatch.setenv("PATH", str(tmp_path))  # no synthesizer on the path
    for voice, package in ((Voice("festival", "kal_diphone"), "festival"),
                           (Voice("pico", "en-US", release=2), "libttspico-utils"),
                           (Voice("mbrola", "de1", release=3), "espeak-ng")):  # fmt: skip
        with pytest.raises(SynthesisError, match=f"apt-get install {package}"):
            synthesize(voice, "hello", tmp_path / "x.wav")


@needs_shared
@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng is not installed")
def test_tiny_synthesis_run(tmp_path):
    real = (SHARED / "speech" / "an4").is_dir()  # the real corpora come first, when there
    main(["--hours", "0.01", "--workers", "1", "--templates", "0", "--out", str(tmp_path),
          *([] if real else ["--no-real"])])  # fmt: skip
    rows = [json.loads(line) for f in ("train.jsonl", "valid.jsonl")
            for line in (tmp_path / f).read_text().splitlines()]  # fmt: skip
    assert rows
    if real:
        real_rows = (tmp_path / "real_train.jsonl").read_text().splitlines()
        assert len(real_rows) > 5000 and json.loads(real_rows[0])["corpus"]
    for row in rows:
        info = sf.info(row["path"])
        assert info.samplerate == 16000 and info.channels == 1
        assert abs(info.duration - row["duration"]) < 1e-3 and info.duration > 0.3
    # A rerun reuses the files (resume after interruption).
    stamp = Path(rows[0]["path"]).stat().st_mtime_ns
    main(["--hours", "0.01", "--workers", "1", "--templates", "0", "--out", str(tmp_path),
          "--no-real"])  # fmt: skip
    assert Path(rows[0]["path"]).stat().st_mtime_ns == stamp
    assert rendered_text(Path(rows[0]["path"])) == rows[0]["text"]
    assert catalogue()  # the installed engines give voices


@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng is not installed")
def test_a_file_is_reused_only_for_its_own_sentence(tmp_path):
    voice = Voice("espeak-ng", "en-us+m1")
    first = _render(("u0000001", "hello there my friend", voice, str(tmp_path)))
    path = Path(first["path"])
    stamp = path.stat().st_mtime_ns
    assert _render(("u0000001", "hello there my friend", voice, str(tmp_path))) == first
    assert path.stat().st_mtime_ns == stamp  # same sentence: reused
    other = _render(("u0000001", "a different and longer sentence now", voice, str(tmp_path)))
    assert other["path"] == first["path"] and other["duration"] > first["duration"]
    assert rendered_text(path) == "a different and longer sentence now"
    path.write_bytes(b"not audio")  # unreadable: made again
    assert rendered_text(path) is None
    again = _render(("u0000001", "hello there my friend", voice, str(tmp_path)))
    assert again == first and not list(tmp_path.rglob("*.part"))


@needs_shared
@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng is not installed")
def test_training_runs_is_seeded_and_resumes(tmp_path):
    import math

    import torch

    from apps.asr.train import decode_greedy, encode
    from apps.asr.train import main as train_main

    main(["--hours", "0.01", "--workers", "1", "--templates", "0", "--out", str(tmp_path),
          "--no-real"])  # fmt: skip
    common = ["--data", str(tmp_path), "--size", "tiny", "--warmup", "5", "--workers", "0",
              "--batch-frames", "3000"]  # fmt: skip
    first = train_main([*common, "--epochs", "1", "--restart"])
    again = train_main([*common, "--epochs", "1", "--restart"])
    assert first["history"] == again["history"]  # same seed, same run
    assert math.isfinite(first["history"][0]["loss"])
    resumed = train_main([*common, "--epochs", "2"])  # continues from the checkpoint
    assert [h["epoch"] for h in resumed["history"]] == [0, 1]
    assert resumed["history"][0] == first["history"][0]
    from apps.asr.evaluate import main as evaluate_main
    from apps.asr.export import main as export_main

    train_rows = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    valid = [json.loads(x) for x in (tmp_path / "valid.jsonl").read_text().splitlines()]
    assert {r["release"] for r in train_rows + valid} == {1}  # --hours 0.01: release 1 only
    if not valid:  # so few sentences may all go to training voices: score one anyway
        valid = train_rows[:1]
        (tmp_path / "valid.jsonl").write_text(json.dumps(valid[0]) + "\n")
    report = evaluate_main(["--data", str(tmp_path), "--lj-limit", "2", "--beam", "4"])
    for part in ("held_out_voices", "lj001"):
        assert {"cer_greedy", "wer_greedy", "cer_lm", "wer_lm"} <= set(report[part])
    assert report["held_out_voices"]["n"] == len(valid)
    assert set(report["per_voice"]) == {r["speaker"] for r in valid}
    assert set(report["per_release"]) == {"1"}
    assert (tmp_path / "eval.json").is_file() and report["decoder"]["beam_width"] == 4
    # The decoder settings chosen on LJ001's first clips, then used by evaluate and export.
    from apps.asr.tune import main as tune_main

    chosen = tune_main(["--data", str(tmp_path), "--beams", "1,4", "--alphas", "0.5,0.8",
                        "--betas", "1.0", "--lj-dev", "2", "--held-out", "2",
                        "--lexicon-alphas", "0.65", "--lexicon-betas", "1.0"])  # fmt: skip
    assert chosen["beam_width"] in (1, 4) and chosen["lj_dev"] == 2 and len(chosen["grid"]) == 5
    # Both search modes scored at the chosen beam; lexicon mode is the default
    # only where it beats the free search by more than the tolerance (1 point).
    modes = chosen["modes"]
    assert set(modes) == {"free", "lexicon"} and modes["lexicon"]["alpha"] == 0.65
    assert chosen["dev_wer"] == modes[chosen["mode"]]["wer"]
    lexicon_wins = modes["lexicon"]["wer"] < modes["free"]["wer"] - 0.01
    assert chosen["mode"] == ("lexicon" if lexicon_wins else "free")
    free_rows = [r for r in chosen["grid"] if r.get("mode", "free") == "free"]
    assert all(r["wer"] >= modes["free"]["wer"] for r in free_rows if r["beam_width"] == 4)
    tuned = evaluate_main(["--data", str(tmp_path), "--lj-limit", "3"])
    assert tuned["decoder"] == {k: chosen[k] for k in ("beam_width", "alpha", "beta", "mode")}
    assert tuned["lj001_test"]["n"] == 1 and tuned["lj001_test"]["first_clip"] == 3
    artifact = export_main(["--data", str(tmp_path), "--out", str(tmp_path / "model.ds")])
    assert artifact.is_file()
    from engine import read_manifest as read_artifact_manifest

    recorded = {m: {"alpha": v["alpha"], "beta": v["beta"]} for m, v in modes.items()}
    assert read_artifact_manifest(artifact)[0].extra["decoder"] == {**tuned["decoder"],
                                                                    "modes": recorded}  # fmt: skip
    # A retuned decoder goes into the artifact without a new export.
    (tmp_path / "decoder.json").write_text(json.dumps({**chosen, "alpha": 0.3}))
    export_main(["--data", str(tmp_path), "--out", str(artifact), "--decoder-only"])
    assert read_artifact_manifest(artifact)[0].extra["decoder"]["alpha"] == 0.3
    # Training goes on from the artifact alone (apps.asr.recover: no optimizer moments).
    from apps.asr.recover import main as recover_main

    recover_main([str(artifact), "--out", str(tmp_path / "ckpt" / "recovered.pt")])
    more = train_main([*common, "--ckpt-name", "recovered.pt", "--epochs", "3"])
    assert more["history"][:2] == resumed["history"] and more["history"][2]["epoch"] == 2
    assert more["changes"][-1] == {"step": resumed["step"], "recovered": "model.ds"}
    # INT8: post-training quantization and quantization-aware fine-tuning, both scored
    # like the float model and exported as streaming INT8 artifacts.
    from apps.asr.quantize import main as quantize_main
    from engine import InferenceEngine

    small = ["--data", str(tmp_path), "--limit", "4", "--lj-limit", "1", "--threads", "1"]
    ptq = quantize_main(
        [*small, "--calib", "3", "--sweep", "1,2", "--out", str(tmp_path / "p8.ds")]
    )
    assert set(ptq["sweep"]) == {1, 2} and set(ptq["int8"]) == set(ptq["float"])
    quantize_main([*small, "--calib", "2", "--left", "3", "--out", str(tmp_path / "g8.ds")])
    assert read_artifact_manifest(tmp_path / "g8.ds")[0].extra["model"]["left"] == 3
    qat = train_main([*common, "--qat", "--epochs", "1", "--lr", "1e-4"])
    assert qat["qat_from_step"] == resumed["step"] and qat["history"][0]["epoch"] == 0
    assert (tmp_path / "ckpt" / "last.pt").is_file()  # the float model is untouched
    from_qat = quantize_main([*small, "--qat", "--out", str(tmp_path / "q8.ds")])
    assert from_qat["quant_config"]["mode"] == "static" and "int8" in from_qat
    for path in ("p8.ds", "q8.ds", "model.ds"):
        assert InferenceEngine(tmp_path / path).open_session() is not None
    assert (tmp_path / "q8.ds").stat().st_size < 0.6 * (tmp_path / "model.ds").stat().st_size
    # Structured pruning, then fine-tuning the pruned architecture with the training recipe.
    from apps.asr.prune import main as prune_main

    pruned = prune_main([*small, "--amounts", "0.5"])["rows"]
    assert pruned[1]["parameters"] < pruned[0]["parameters"] and pruned[1]["step_ms_b64"] > 0
    init = tmp_path / "ckpt" / "pruned-50.pt"
    tuned = train_main([*common, "--init", str(init), "--ckpt-name", "ft.pt", "--epochs", "1"])
    assert tuned["init"] == str(init) and (tmp_path / "ckpt" / "ft.pt").is_file()
    # Going on without dropout, the last epoch annealing the learning rate to zero.
    annealed = train_main([*common, "--epochs", "3", "--anneal-epochs", "1", "--dropout", "0"])
    assert [h["epoch"] for h in annealed["history"]] == [0, 1, 2]
    assert annealed["anneal"]["from_step"] == resumed["step"] and annealed["anneal"]["steps"] > 0
    # The channel augmentation is on from the start (the default), dropout changed later.
    assert annealed["changes"] == [
        {"step": 0, "eq": 0.5},
        {"step": resumed["step"], "dropout": 0.0},
    ]
    saved = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=False)
    assert saved["config"]["dropout"] == 0.0
    with pytest.raises(SystemExit, match="annealed to zero at epoch 3"):
        train_main([*common, "--epochs", "4"])  # past the annealing: a rate of zero
    again = train_main([*common, "--epochs", "4", "--anneal-epochs", "1", "--vtlp", "0.5",
                        "--eq", "0", "--release-weights", "2"])  # fmt: skip
    assert again["past_anneals"] == [annealed["anneal"]]  # a warm restart
    step = annealed["step"]
    assert again["changes"][-3:] == [{"step": step, "vtlp": 0.5}, {"step": step, "eq": 0.0},
                                     {"step": step, "release_weights": [2.0]}]  # fmt: skip
    steps = annealed["anneal"]["steps"]  # one epoch each time
    assert again["anneal"]["from_step"] == annealed["step"] and again["anneal"]["to_epoch"] == 4
    # Every utterance twice: about twice the batches (a batch holds up to its frame budget).
    assert 1.7 * steps <= again["anneal"]["steps"] <= 2 * steps
    assert encode("it's a") == [11, 22, 2, 21, 1, 3]
    logp = torch.full((6, 29), -9.0)
    for t, tok in enumerate([3, 3, 0, 1, 4, 4]):
        logp[t, tok] = 0.0
    assert decode_greedy(logp) == "a b"


@pytest.mark.parametrize("flag", ["--eq", "--vtlp"])
def test_augmentation_probabilities_are_checked(flag, tmp_path, capsys):
    from apps.asr.train import main as train_main

    with pytest.raises(SystemExit):
        train_main(["--data", str(tmp_path), flag, "1.5"])
    assert f"{flag} is a probability per utterance, 0 to 1: got 1.5" in capsys.readouterr().err


def test_learning_rate_warms_up_decays_and_anneals_to_zero():
    from apps.asr.train import lr_at

    assert lr_at(0, 1e-3, 100) == pytest.approx(1e-5)
    assert lr_at(99, 1e-3, 100) == pytest.approx(1e-3)  # the peak ends the warm-up
    assert lr_at(399, 1e-3, 100) == pytest.approx(5e-4)  # then 1/sqrt(step)
    anneal = {"from_step": 399, "steps": 200}
    assert lr_at(398, 1e-3, 100, anneal) == lr_at(398, 1e-3, 100)  # before: unchanged
    assert lr_at(499, 1e-3, 100, anneal) == pytest.approx(2.5e-4)  # half way: half
    assert lr_at(599, 1e-3, 100, anneal) == 0.0 and lr_at(700, 1e-3, 100, anneal) == 0.0


def _release_rows(n_per_release: int = 40) -> list[dict]:
    return [{"release": r, "duration": 1.0 + (i % 7) / 10, "path": f"r{r}-{i}.flac", "text": "a"}
            for r in (1, 2, 3) for i in range(n_per_release)]  # fmt: skip


def test_release_weights_choose_each_epochs_utterances():
    from collections import Counter

    from apps.asr.train import epoch_indices, length_batches

    rows = _release_rows()
    n = len(rows)
    assert length_batches(rows, 300, 0, 3, list(range(n))) == length_batches(rows, 300, 0, 3)
    picked = epoch_indices(rows, (0.5, 2.0), seed=0, epoch=3)
    assert picked == epoch_indices(rows, (0.5, 2.0), seed=0, epoch=3)  # seeded
    assert picked != epoch_indices(rows, (0.5, 2.0), seed=0, epoch=4)  # another half next epoch
    copies = Counter(i % n for i in picked)
    release_1 = [copies[i] for i in range(40)]
    assert set(release_1) == {0, 1} and 10 <= sum(release_1) <= 30  # about half, once at most
    assert all(copies[i] == 2 for i in range(40, 80))  # twice: row i and its copy i + n
    assert sorted(i for i in picked if 40 <= i % n < 80) == [*range(40, 80), *range(n + 40, n + 80)]
    assert all(copies[i] == 1 for i in range(80, 120))  # past the weights given: once
    batches = length_batches(rows, 300, 0, 3, picked)
    assert sorted(i for b in batches for i in b) == sorted(picked)
    assert epoch_indices(rows, (), 0, 0) == list(range(n))


def test_each_copy_of_an_utterance_is_augmented_differently(tmp_path):
    import numpy as np
    import torch

    from apps.asr.augment import AugmentConfig
    from apps.asr.train import SpeechSet
    from dsstream.frontend import FbankConfig

    rng = np.random.default_rng(0)
    rows = []
    for i in range(2):
        path = tmp_path / f"u{i}.flac"
        sf.write(path, (0.1 * rng.standard_normal(16000)).astype("float32"), 16000)
        rows.append({"path": str(path), "text": "a b", "duration": 1.0})
    data = SpeechSet(rows, FbankConfig(), AugmentConfig(), seed=0)
    first, again, copy = data[1][0], data[1][0], data[1 + len(rows)][0]
    assert torch.equal(first, again)  # the same copy, the same augmentation
    assert not torch.equal(first, copy)  # copy 1 draws its own
    assert data[3][2] == data[1][2] == "a b"


def test_release_weights_are_checked_and_recorded(tmp_path, capsys):
    import argparse

    from apps.asr.card import _CHANGES
    from apps.asr.train import _release_weights
    from apps.asr.train import main as train_main

    rows = _release_rows(2)
    state: dict = {"step": 7}
    args = argparse.Namespace(release_weights=[0.5, 1.5])
    assert _release_weights(args, state, rows) == (0.5, 1.5)
    assert _release_weights(args, state, rows) == (0.5, 1.5)  # unchanged: recorded once
    assert state["changes"] == [{"step": 7, "release_weights": [0.5, 1.5]}]
    state["step"] = 9
    assert _release_weights(argparse.Namespace(release_weights=[1, 1]), state, rows) == ()
    assert state["changes"][-1] == {"step": 9, "release_weights": []}
    with pytest.raises(SystemExit, match="releases 1 to 3"):
        _release_weights(argparse.Namespace(release_weights=[1, 1, 1, 2]), state, rows)
    words = _CHANGES["release_weights"]
    assert (
        words([0.5, 1.5])
        == "per epoch release 1 0.5 times, release 2 1.5 times (later releases once)"
    )
    assert words([]) == "every voice release once per epoch"
    for bad in (["-1"], ["0", "0"]):
        with pytest.raises(SystemExit):
            train_main(["--data", str(tmp_path), "--release-weights", *bad])
        assert "--release-weights must be >= 0, not all 0" in capsys.readouterr().err


def test_the_narrowest_beam_near_the_best_wer_is_chosen():
    from apps.asr.tune import choose

    rows = [{"beam_width": b, "alpha": a, "beta": 1.0, "wer": w} for b, a, w in (
        (8, 0.5, 0.66), (8, 0.8, 0.70), (32, 0.5, 0.62), (128, 0.5, 0.60), (128, 0.65, 0.587),
        (256, 0.65, 0.581))]  # fmt: skip
    assert choose(rows, 0.01) == rows[4]  # 128 at its best alpha: within 1 point of 256
    assert choose(rows, 0.0) == rows[5]
    assert choose(rows, 0.1) == rows[0]  # beam 8 at alpha 0.5, not its worse 0.8


def test_lexicon_mode_must_beat_the_free_search_by_more_than_the_tolerance():
    from apps.asr.tune import choose_mode

    modes = {"free": {"wer": 0.3661}, "lexicon": {"wer": 0.3647}}
    assert choose_mode(modes, 0.01) == "free"  # 0.14 points: a tie
    assert choose_mode(modes, 0.0) == "lexicon"
    assert choose_mode({"free": {"wer": 0.40}, "lexicon": {"wer": 0.38}}, 0.01) == "lexicon"
    assert choose_mode({"free": {"wer": 0.38}, "lexicon": {"wer": 0.38}}, 0.0) == "free"
    assert choose_mode({"free": {"wer": 0.38}}, 0.01) == "free"


def test_the_card_says_when_the_free_search_won_a_tie(tmp_path):
    from apps.asr.card import _modes_note
    from apps.asr.tune import lowest_wer_mode

    def note(chosen: str, free: float, lexicon: float) -> str:
        modes = {"free": {"alpha": 0.5, "beta": 1.0, "wer": free},
                 "lexicon": {"alpha": 0.5, "beta": 0.0, "wer": lexicon}}  # fmt: skip
        record = {"mode": chosen, "modes": modes, "tolerance": 1.0,
                  "free_kept_by_tolerance": chosen != lowest_wer_mode(modes)}  # fmt: skip
        (tmp_path / "decoder.json").write_text(json.dumps(record))
        return _modes_note(tmp_path)

    tie = note("free", 0.3661, 0.3647)
    assert "36.6% WER on the dev set, where lexicon mode" in tie
    assert "within the 1-point tolerance, so the free search" in tie
    assert "tolerance" not in note("free", 0.3881, 0.3911)
    assert note("lexicon", 0.40, 0.38).startswith(". The lexicon search was chosen")


def test_the_card_follows_the_runs_a_model_came_through(tmp_path):
    import torch

    from apps.asr.card import _history_rows, _init_words, _lineage, _time_words

    row = {"epoch": 0, "step": 10, "loss": 1.0, "valid_cer": 0.3}
    synthetic = {"epoch": 56, "step": 31884, "history": [{**row, "valid_cer": 0.15}]}
    torch.save({"state": synthetic}, tmp_path / "shipped.pt")
    real = {"epoch": 8, "step": 3784, "init": str(tmp_path / "shipped.pt"),
            "history": [{**row, "valid": "real_dev.jsonl"}]}  # fmt: skip
    torch.save({"state": real}, tmp_path / "real-e8.pt")
    deep = {"epoch": 6, "step": 2838, "init": str(tmp_path / "real-e8.pt"), "seconds": 5400,
            "grown": {"from_layers": 6, "layers": 10},
            "history": [{**row, "epoch": 5, "valid_cer": 0.2289,
                         "valid": "real_dev.jsonl"}]}  # fmt: skip
    assert _init_words(deep, _lineage(deep)) == (
        "grown from 6 to 10 blocks (new blocks inserted as identities) from `real-e8.pt`"
        " (8 epochs, 3784 steps on real and synthesized speech), itself initialized from"
        " `shipped.pt` (56 epochs, 31884 steps on synthesized speech only), then trained"
    )
    # The synthetic-only run was scored on other voices: its rows stay off the table.
    assert _history_rows(deep, "deep10.pt", _lineage(deep)).splitlines() == [
        "| `real-e8.pt` | 0 | 10 | 1.000 | 30.0% |",
        "| `deep10.pt` | 5 | 10 | 1.000 | 22.9% |",
    ]
    assert _time_words(deep) == " (1.5 h of wall time)" and _time_words(real) == ""
    gone = {"init": str(tmp_path / "gone.pt")}
    assert _init_words(gone, _lineage(gone)) == "initialized from `gone.pt`, then trained"
    assert _init_words(synthetic, _lineage(synthetic)) == "trained from scratch"


def test_the_card_words_only_changes_that_trained_the_model():
    from apps.asr.card import _run_notes

    state = {
        "step": 500,
        "data": [{"epoch": 0, "utterances": 10, "hours": 1.0},
                 {"epoch": 3, "utterances": 20, "hours": 2.04}],
        "changes": [{"step": 100, "dropout": 0.0}, {"step": 500, "recovered": "model.ds"}],
        "past_anneals": [{"from_step": 200, "steps": 50}],
    }  # fmt: skip
    notes = _run_notes(state)
    assert "from epoch 3, 20 utterances (2.0 h)" in notes
    assert "From step 100, dropout 0." in notes
    assert "From step 200, the learning rate fell linearly to zero over 50 steps." in notes
    assert "model.ds" not in notes  # recovered at the last step: nothing trained after it
    state["step"] = 600
    assert "From step 500, training went on from the weights in model.ds" in _run_notes(state)


def test_the_card_says_how_the_int8_model_was_quantized(tmp_path):
    from apps.asr.card import _quantization_words
    from apps.asr.quantize import record_path

    old = {"mode": "static", "observer": "minmax", "calibration": 256, "keep_float": []}
    assert _quantization_words(old) == (
        "Static post-training quantization (`python -m apps.asr.quantize --out "
        "samples/asr/model-int8.ds`): int8 weights per output channel, activations per "
        "tensor from min/max over 256 training utterances."
    )
    mixed = {**old, "observer": "mse", "keep_float": ["head", "sub.conv1"], "sensitivity": 16}
    words = _quantization_words(mixed)
    assert "--observer mse --sensitivity 16 --keep-float 2 --out" in words
    assert "the clipping with the least quantize-dequantize error" in words
    assert words.endswith("kept in float32, as the most sensitive: head, sub.conv1.")
    assert record_path(tmp_path, "static", "mse", 2) == tmp_path / "quant-static-mse-keep2.json"
    assert record_path(tmp_path, "static", "minmax") == tmp_path / "quant-static-minmax.json"


def test_the_lm_leaves_out_evaluation_and_held_out_voices_sentences(tmp_path):
    import json

    from apps.asr.lm import main as lm_main

    shared = tmp_path / "shared"
    (shared / "text").mkdir(parents=True)
    for folder in ("gutenberg", "nltk_state_union", "nltk_inaugural"):
        (shared / "text" / folder).mkdir()
    lines = ["the cat sat on the mat", "a dog ran in the park", "zebras graze quietly",
             "walruses bask on ice", "the bird sang a song"]  # fmt: skip
    (shared / "text" / "ljspeech_sentences.txt").write_text("\n".join(lines * 3) + "\n")
    (shared / "speech" / "lj001").mkdir(parents=True)
    (shared / "speech" / "lj001" / "transcripts.tsv").write_text(
        "LJ001-0001\tZebras graze quietly.\n"
    )
    valid = tmp_path / "valid.jsonl"
    valid.write_text(json.dumps({"path": "x.flac", "text": "walruses bask on ice"}) + "\n")
    out = tmp_path / "lm.arpa"
    lm_main(["--shared", str(shared), "--out", str(out), "--held-out-voices", str(valid),
             "--order", "2", "--prune", "0", "0", "--templates", "0"])  # fmt: skip
    unigrams = {line.split("\t")[1] for line in out.read_text().split("\\2-grams:")[0]
                .splitlines() if line.count("\t") >= 1}  # fmt: skip
    assert {"cat", "dog", "bird"} <= unigrams
    assert not {"zebras", "walruses"} & unigrams  # evaluation and held-out voices' text
    assert "and so\nare the 1 sentences the held-out voices" in (tmp_path / "LM.md").read_text()
