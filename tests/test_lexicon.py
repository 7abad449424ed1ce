"""Lexicon-constrained search: only lexicon words (and hotwords) come out, it
fixes the misspellings a free search makes, and the compiled core equals the
Python reference in it as in the free search."""

import numpy as np
import pytest
from conftest import LM_SENTENCES
from emissions import assert_backends_agree, emissions

from dsstream.decoding import CTCDecoder, DecoderConfig, KenLM, Lexicon, LexiconError
from dsstream.decoding.search import native_available
from dsstream.evaluation import wer

SENTENCES = LM_SENTENCES
VOCAB = sorted({w for s in SENTENCES for w in s.split()})

native = pytest.mark.skipif(not native_available(), reason="compiled decoder core not built")


@pytest.fixture(scope="module")
def lm(lm_path):
    return KenLM(lm_path)


def _noisy(seed: int, n: int = 12) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(SENTENCES, 2))
        out.append((text, emissions(text, rng, confusion=0.35, noise=1.6)))
    return out


def test_lexicon_mode_emits_only_lexicon_words_and_fixes_misspellings(lm):
    data = _noisy(3)
    refs = [t for t, _ in data]
    free = CTCDecoder(beam_width=16, language_model=lm, alpha=0.8, beta=1.0)
    lexicon = CTCDecoder(beam_width=16, language_model=lm, alpha=0.8, beta=1.0, mode="lexicon")
    free_hyps = [free.decode(x).text for _, x in data]
    lex_hyps = [lexicon.decode(x).text for _, x in data]
    # The free search spells words that do not exist on this data; lexicon mode never does.
    assert {w for h in free_hyps for w in h.split()} - set(VOCAB)
    assert {w for h in lex_hyps for w in h.split()} <= set(VOCAB)
    assert wer(refs, lex_hyps) < wer(refs, free_hyps)


def test_a_word_list_hotwords_and_the_unk_allowance(lm):
    rng = np.random.default_rng(5)
    x = emissions("the zebra sat", rng)
    words = ["the", "cat", "sat"]
    only = CTCDecoder(beam_width=16, lexicon=words, mode="lexicon")  # no LM: the list alone
    assert set(only.decode(x).text.split()) <= set(words)
    assert "zebra" not in only.decode(x).text
    assert only.decode(x, hotwords=["zebra"]).text == "the zebra sat"  # hotwords always allowed
    unk = CTCDecoder(beam_width=16, lexicon=words, mode="lexicon", lexicon_unk=-3.0)
    assert unk.decode(x).text == "the zebra sat"  # names the list lacks, at a price
    # The LM's vocabulary is the default lexicon; a list replaces it.
    assert "zebra" not in CTCDecoder(language_model=lm, mode="lexicon").decode(x).text
    assert CTCDecoder(language_model=lm, mode="lexicon").lexicon is Lexicon.of(lm)
    assert CTCDecoder(language_model=lm, lexicon=words).lexicon.words == frozenset(words)


def test_the_mode_is_chosen_per_stream(lm):
    x = emissions("the kat sat", np.random.default_rng(2))  # "kat" is no word of the LM
    decoder = CTCDecoder(beam_width=16, language_model=lm)
    assert decoder.decode(x).text == "the kat sat"
    assert decoder.decode(x, mode="lexicon").text == "the cat sat"
    stream = decoder.begin(mode="lexicon")
    stream.step(x)
    assert stream.end().text == "the cat sat"


def test_streaming_words_nbest_in_lexicon_mode(lm):
    rng = np.random.default_rng(7)
    text = "the cat sat on the mat"
    x = emissions(text, rng, confusion=0.2, noise=1.5)
    decoder = CTCDecoder(beam_width=16, language_model=lm, mode="lexicon", frame_shift_s=0.04)
    whole = decoder.decode(x, nbest=4)
    assert whole.text == text
    assert [w.word for w in whole.words] == text.split()
    assert all(0 < w.confidence <= 1 and w.start < w.end for w in whole.words)
    assert len(whole.nbest) > 1 and all(set(t.split()) <= set(VOCAB) for t, _ in whole.nbest)
    for cuts in ([5], [1, 2, 3, 30], list(range(4, len(x), 7))):
        stream = decoder.begin()
        partials = [stream.step(c) for c in np.split(x, cuts)]
        assert stream.end(4) == whole
        # A partial's finished words are lexicon words; its last may be the start of one.
        assert all(set(p.split()[:-1]) <= set(VOCAB) for p in partials)


def test_audio_that_stops_mid_word_still_gives_a_result(lm):
    x = emissions("the cat sat on the mat", np.random.default_rng(1))
    cut = x[: int(len(x) * 0.93)]  # inside "mat": no beam ends on a word
    for backend in ("python",) + (("native",) if native_available() else ()):
        words = [w for w in VOCAB if len(w) > 1]  # no "a": "ma" has no word inside it
        decoder = CTCDecoder(beam_width=8, language_model=lm, lexicon=words, mode="lexicon",
                             backend=backend)  # fmt: skip
        result = decoder.decode(cut, nbest=3)
        # The unfinished word is left out: what comes out is still only lexicon words.
        assert result.text == "the cat sat on the"
        assert [w.word for w in result.words] == result.text.split()
        assert np.isfinite(result.score)


def test_delimiters_with_no_word_open_do_not_fork_the_beam(lm):
    # "the", a delimiter, a blank, a delimiter again, "cat": the same text either
    # way, so one hypothesis, not two crowding the beam.
    rng = np.random.default_rng(4)
    x = emissions("the cat", rng)
    bar = 1  # ENGLISH_CHARS: blank, "|", ...
    doubled = np.concatenate([x[:1], x[:1], x])  # frames before "the": blank-dominated
    doubled[0] = np.log(np.full(x.shape[1], 0.02 / (x.shape[1] - 1)))
    doubled[0, bar] = np.log(0.98)  # a delimiter before any word
    for backend in ("python",) + (("native",) if native_available() else ()):
        stream = CTCDecoder(beam_width=8, language_model=lm, backend=backend).begin()
        stream.step(doubled)
        search = stream.search
        paths = [tuple(search.path_info(n)[0]) for n, _, _ in search.beams]
        assert all(p[:1] != (bar,) for p in paths), paths  # the leading "|" merged into the root
        assert stream.end().text == "the cat"


def test_bad_lexicon_settings_are_clear_errors(lm):
    with pytest.raises(ValueError, match="lexicon mode needs"):
        CTCDecoder(mode="lexicon")
    with pytest.raises(ValueError, match="lexicon mode needs"):
        CTCDecoder().decode(emissions("a", np.random.default_rng(0)), mode="lexicon")
    with pytest.raises(LexiconError, match="whitespace"):
        Lexicon(["new york"])
    with pytest.raises(LexiconError, match="no words"):
        Lexicon([])
    with pytest.raises(LexiconError, match="cannot spell"):
        CTCDecoder(lexicon=["Hello", "world"])
    with pytest.raises(ValueError, match="mode must be one of"):
        DecoderConfig(mode="closed")
    with pytest.raises(ValueError, match="lexicon_unk"):
        DecoderConfig(lexicon_unk=float("nan"))


@native
@pytest.mark.parametrize("seed", range(6))
def test_native_core_is_identical_to_python_in_lexicon_mode(lm, seed):
    rng = np.random.default_rng(200 + seed)
    text = " ".join(rng.choice(SENTENCES, 2))
    x = emissions(text, rng, confusion=0.3, noise=1.5)
    knobs = [
        {},
        {"beam_width": 3, "top_k": 3},
        {"lexicon_unk": -4.0},
        {"lexicon_lookahead": False, "alpha": 1.5, "beta": -1.0},
    ][seed % 4]
    hotwords = [None, ["cat", ("sea shore", 2.0), "zebra"], [f"w{i}" for i in range(50)]][seed % 3]
    for source in ("lm", "list", "both"):
        kw = {
            "beam_width": 16,
            "mode": "lexicon",
            "language_model": None if source == "list" else lm,
            "lexicon": None if source == "lm" else VOCAB[::2] + ["zebu"],
            **knobs,
        }
        assert_backends_agree(kw, x, hotwords, rng)
