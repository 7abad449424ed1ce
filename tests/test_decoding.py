"""CTC prefix beam search: text against transcripts, LM fusion, hotwords,
streaming against whole-matrix decoding, results, and input errors."""

import gc

import numpy as np
import pytest
import torch
from conftest import LM_SENTENCES
from emissions import assert_backends_agree, emissions

from dsstream.decoding import (
    ENGLISH_CHARS,
    CTCDecoder,
    HotwordTrie,
    KenLM,
    LMError,
    Vocabulary,
    VocabularyError,
    greedy_decode,
)
from dsstream.decoding.grammar import Grammar, GrammarError, GrammarSearch
from dsstream.decoding.hotwords import HotwordState
from dsstream.decoding.search import native_available
from dsstream.evaluation import cer, wer

SENTENCES = LM_SENTENCES


@pytest.fixture(scope="module")
def lm(lm_path):
    return KenLM(lm_path)


def test_clean_emissions_decode_exactly_with_and_without_beam():
    rng = np.random.default_rng(0)
    for text in ["hello world", "the quick brown fox", "it's a dog's life", "a"]:
        x = emissions(text, rng)
        assert greedy_decode(x) == text
        assert CTCDecoder(beam_width=8).decode(x).text == text


def test_space_delimiter_vocabulary_and_torch_input():
    import torch

    vocab = Vocabulary(("_", " ", *"abcdefghijklmnopqrstuvwxyz"), 0, delimiter=" ")
    x = emissions("good morning", np.random.default_rng(1), vocab)
    assert CTCDecoder(vocab).decode(torch.from_numpy(x)).text == "good morning"


def test_labels_as_pyctcdecode_and_wav2vec2_take_them():
    """A plain label list works as other decoders take it: pyctcdecode's (" "
    between words, "" the blank wherever it stands) and wav2vec2's ("|",
    "<pad>" first); one with neither delimiter says what to pass."""
    letters = list("abcdefghijklmnopqrstuvwxyz'")
    rng = np.random.default_rng(3)
    for labels in ([" ", *letters, ""], ["<pad>", "|", *letters]):
        decoder = CTCDecoder(labels)
        vocab = decoder.vocab
        assert vocab.tokens[vocab.blank_id] in ("", "<pad>") and vocab.delimiter == labels[
            0 if labels[0] == " " else 1]  # fmt: skip
        x = emissions("it's a good morning", rng, vocab)
        assert decoder.decode(x).text == "it's a good morning"
    with pytest.raises(VocabularyError, match=r"' ' \(pyctcdecode's convention\) or '\|'"):
        CTCDecoder(["<pad>", *letters])


def test_bpe_vocabulary_with_word_start_marker(lm_path):
    pieces = ["<blank>", "\u2581the", "\u2581c", "at", "\u2581s", "\u2581on", "\u2581m", "\u2581"]
    vocab = Vocabulary(tuple(pieces), 0, kind="bpe")
    seq = [1, 2, 3, 4, 3, 5, 1, 6, 3]  # the cat sat on the mat
    x = np.full((len(seq) * 3, len(pieces)), -8.0, np.float32)
    x[:, 0] = -0.01
    for i, tok in enumerate(seq):
        x[3 * i, :] = -8.0
        x[3 * i, tok] = -0.01
    for decoder in (CTCDecoder(vocab), CTCDecoder(vocab, language_model=lm_path)):
        assert decoder.decode(x).text == "the cat sat on the mat"
    assert greedy_decode(x, vocab) == "the cat sat on the mat"


def _wer(ref: str, hyp: str) -> float:
    return wer([ref], [hyp])


def test_lm_fusion_fixes_acoustic_confusions(lm_path):
    rng = np.random.default_rng(2)
    texts = SENTENCES[:8]
    mats = [emissions(t, rng, confusion=0.25) for t in texts]
    greedy = np.mean([_wer(t, greedy_decode(m)) for t, m in zip(texts, mats)])
    no_lm = CTCDecoder(beam_width=16)
    with_lm = CTCDecoder(beam_width=16, language_model=lm_path, alpha=0.8, beta=1.0)
    plain = np.mean([_wer(t, no_lm.decode(m).text) for t, m in zip(texts, mats)])
    fused = np.mean([_wer(t, with_lm.decode(m).text) for t, m in zip(texts, mats)])
    assert greedy > 0.2 and plain > 0.2  # the confusions really are errors
    assert fused < 0.05 < plain


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_in_any_chunking_equals_whole_matrix(lm, seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([emissions(t, rng, confusion=0.3, noise=1.0) for t in SENTENCES[:3]])
    decoder = CTCDecoder(beam_width=12, language_model=lm)
    hotwords = [("sea shells", 4.0), "lazy"]
    whole = decoder.decode(x, hotwords=hotwords, nbest=4)
    stream = decoder.begin(hotwords=hotwords)
    cuts = np.sort(rng.choice(np.arange(1, len(x)), size=12, replace=False))
    partials = [stream.step(chunk) for chunk in np.split(x, cuts)]
    assert stream.end(nbest=4) == whole
    assert partials[-1] and all(isinstance(p, str) for p in partials)


def test_partial_grows_with_the_stream():
    rng = np.random.default_rng(3)
    x = emissions("one two three", rng)
    stream = CTCDecoder().begin()
    seen = [stream.step(chunk) for chunk in np.array_split(x, 6)]
    assert seen[-1] == "one two three"
    assert seen[0] != seen[-1] and "one two three".startswith(seen[2].split()[0])


def _ambiguous(word_a: str, word_b: str, rng) -> np.ndarray:
    """Emissions where word_b's letters narrowly win where the two words differ."""
    assert len(word_a) == len(word_b)
    x = emissions(word_a, rng, noise=0.1)
    index = {t: i for i, t in enumerate(ENGLISH_CHARS.tokens)}
    for t in range(len(x)):
        best = int(np.argmax(x[t]))
        for a, b in zip(word_a, word_b):
            if a != b and best == index[a]:
                x[t, index[b]] = x[t, best] + 0.3
    return x - np.log(np.exp(x.astype(np.float64)).sum(axis=1, keepdims=True)).astype(np.float32)


def test_hotword_changes_an_ambiguous_recognition(lm):
    x = _ambiguous("kenlm", "kenlo", np.random.default_rng(4))
    decoder = CTCDecoder(beam_width=16, language_model=lm)
    assert decoder.decode(x).text == "kenlo"
    assert decoder.decode(x, hotwords=[("kenlm", 3.0)]).text == "kenlm"  # not in the LM
    assert CTCDecoder(beam_width=16).decode(x, hotwords=["kenlm"]).text == "kenlm"


@pytest.mark.parametrize("backend", ["python", "native"])
def test_a_prebuilt_hotword_trie_decodes_as_its_phrases_do(lm, backend):
    if backend == "native" and not native_available():
        pytest.skip("native decoder not built")
    x = _ambiguous("kenlm", "kenlo", np.random.default_rng(4))
    decoder = CTCDecoder(beam_width=16, language_model=lm, backend=backend)
    trie = decoder.hotwords(["kenlm", ("holmes", 2.0)])
    assert isinstance(trie, HotwordTrie) and len(trie) == 2
    assert trie.score[-1] == 2.0  # "holmes" kept its own boost
    given, built = (
        decoder.decode(x, hotwords=["kenlm", ("holmes", 2.0)]),
        decoder.decode(x, hotwords=trie),
    )
    assert (built.text, built.score, built.words) == (given.text, given.score, given.words)
    assert built.text == "kenlm"
    assert decoder.hotwords([]) is None and decoder.hotwords(None) is None
    assert decoder.begin(hotwords=HotwordTrie([])).search.cfg.beam_width == 16  # as none


def test_many_unrelated_hotwords_leave_the_best_hypothesis_alone(lm):
    rng = np.random.default_rng(5)
    x = emissions("the cat sat on the mat", rng, confusion=0.2)
    decoder = CTCDecoder(beam_width=10, language_model=lm)
    # Unrelated phrases still spare their own prefixes ("z...") the OOV
    # penalty, so lower n-best entries may differ; the best may not.
    junk = [f"zq{i}xv" for i in range(1000)]
    # Streams with hotwords search at least decoder.hotword_beam_width (16).
    with_junk, plain = decoder.decode(x, hotwords=junk), decoder.decode(x, beam_width=16)
    assert (with_junk.text, with_junk.score, with_junk.words) == (
        plain.text,
        plain.score,
        plain.words,
    )


@pytest.mark.parametrize("backend", ["python", "native"])
def test_streams_with_hotwords_search_a_wider_beam(backend):
    if backend == "native" and not native_available():
        pytest.skip("native decoder not built")
    decoder = CTCDecoder(beam_width=4, backend=backend)

    def width(decoder: CTCDecoder, **kwargs) -> int:
        return decoder.begin(**kwargs).search.cfg.beam_width

    assert width(decoder) == 4 and width(decoder, hotwords=[]) == 4
    assert width(decoder, hotwords=["holmes"]) == 16  # the default hotword_beam_width
    assert width(decoder, hotwords=["holmes"], beam_width=32) == 32  # never narrower
    assert width(CTCDecoder(beam_width=4, hotword_beam_width=None), hotwords=["x"]) == 4
    with pytest.raises(ValueError, match="hotword_beam_width"):
        CTCDecoder(hotword_beam_width=0)


def test_hotword_trie_credit_is_given_while_spelling_and_taken_back():
    trie = HotwordTrie([("kenlm", 2.0), ("new york", 1.5), ("new", 0.5)])
    assert len(trie) == 3
    s = HotwordState()
    for i, ch in enumerate("ken"):
        s = trie.char(s, ch, i == 0)
    assert s.bonus(trie) == pytest.approx(2.0 * 3 / 5)
    abandoned = trie.char(s, "x", False)
    assert abandoned.bonus(trie) == 0.0 and abandoned.node == 0
    # Mid-word letters never start a match; a word start does.
    assert trie.char(HotwordState(), "k", False).node == 0
    done = s
    for ch in "lm":
        done = trie.char(done, ch, False)
    done = trie.word_end(done)
    assert done.banked == pytest.approx(2.0) and done.bonus(trie) == pytest.approx(2.0)
    # "new" completes (banked 0.5 * ... at least), and "new york" continues.
    s = HotwordState()
    for i, ch in enumerate("new"):
        s = trie.char(s, ch, i == 0)
    s = trie.word_end(s)
    assert s.node != 0 and s.banked == pytest.approx(3.0 * 3 / 8)
    for i, ch in enumerate("york"):
        s = trie.char(s, ch, i == 0)
    s = trie.finish(s)
    assert s.banked == pytest.approx(3.0)  # 2 words x 1.5
    # Abandoning "new york" after "new " keeps what "new" earned.
    s = HotwordState()
    for i, ch in enumerate("new"):
        s = trie.char(s, ch, i == 0)
    s = trie.word_end(s)
    s = trie.finish(trie.char(s, "z", True))
    assert s.banked == pytest.approx(3.0 * 3 / 8)


def test_nbest_words_timestamps_and_confidence(lm):
    rng = np.random.default_rng(6)
    text = "the dog sat on the log"
    x = emissions(text, rng, noise=1.0)
    decoder = CTCDecoder(beam_width=10, language_model=lm, beam_prune_logp=-40.0)
    result = decoder.decode(x, nbest=5)
    assert result.text == text and result.nbest[0][0] == text
    scores = [s for _, s in result.nbest]
    texts = [t for t, _ in result.nbest]
    assert scores == sorted(scores, reverse=True) and 3 <= len(set(texts)) == len(texts) <= 5
    assert [w.word for w in result.words] == text.split()
    duration = len(x) * 0.04
    starts = [w.start for w in result.words]
    assert starts == sorted(starts)
    for word, nxt in zip(result.words, result.words[1:]):
        assert 0 <= word.start < word.end <= nxt.start
    assert result.words[-1].end <= duration
    assert all(0.3 < w.confidence <= 1 for w in result.words)
    # The first token's frame is where the layout put it.
    first_frame = int(np.argmax(np.argmax(x, axis=1) != 0))
    assert result.words[0].start == pytest.approx(first_frame * 0.04)


def test_time_offset_and_confidence_drop_for_noisy_words():
    rng = np.random.default_rng(7)
    clean = emissions("good", rng, noise=0.1)
    noisy = emissions("good", rng, noise=2.5)
    decoder = CTCDecoder()
    a = decoder.begin(time_offset=10.0)
    a.step(clean)
    word = a.end().words[0]
    assert word.start >= 10.0
    b = decoder.decode(noisy).words
    assert b and b[0].confidence < word.confidence


def test_pruning_knobs_keep_clean_results(lm):
    rng = np.random.default_rng(8)
    x = emissions("the weather is nice today", rng)
    base = CTCDecoder(beam_width=16, language_model=lm).decode(x).text
    for knobs in [
        {"blank_skip_logp": None},
        {"token_min_logp": -2.0},
        {"top_k": 2},
        {"beam_prune_logp": -3.0},
        {"beam_width": 1},
    ]:
        assert CTCDecoder(language_model=lm, **{"beam_width": 16, **knobs}).decode(x).text == base


def test_decode_batch_equals_single_decodes(lm):
    rng = np.random.default_rng(9)
    mats = [emissions(t, rng, confusion=0.2) for t in SENTENCES[:6]]
    decoder = CTCDecoder(beam_width=8, language_model=lm)
    batch = decoder.decode_batch(mats, nbest=2, max_workers=3)
    assert batch == [decoder.decode(m, nbest=2) for m in mats]
    per_item = decoder.decode_batch(mats[:2], hotwords_per_item=[["zebra"], None])
    assert per_item[1] == decoder.decode(mats[1])


@pytest.mark.parametrize("backend", ["python", "native"])
@pytest.mark.parametrize("mode", ["free", "lexicon"])
def test_lm_state_cache_scores_each_word_once_per_context(lm_path, backend, mode):
    if backend == "native" and not native_available():
        pytest.skip("native decoder not built")

    class Counting:  # kenlm.Model, counting the n-gram lookups
        def __init__(self, model):
            self.model, self.calls = model, 0

        def BaseScore(self, *args):
            self.calls += 1
            return self.model.BaseScore(*args)

        def __getattr__(self, name):
            return getattr(self.model, name)

    lm = KenLM(lm_path)
    lm.model = counting = Counting(lm.model)
    x = emissions("the cat sat on the mat", np.random.default_rng(10), confusion=0.3)
    for _ in range(2):
        before = counting.calls
        CTCDecoder(beam_width=16, language_model=lm, backend=backend, mode=mode).decode(x)
        looked_up = counting.calls - before
    assert counting.calls > 0 and looked_up == 0  # the second pass hit the cache only


@pytest.mark.skipif(not native_available(), reason="compiled decoder core not built")
@pytest.mark.parametrize("mode", ["free", "lexicon"])
def test_native_core_queries_kenlm_directly_and_once_per_context(lm_path, mode):
    lm = KenLM(lm_path)
    info = lm.native_info()
    assert info.direct  # the kenlm package's C++ model, with no Python on a miss
    x = emissions("the cat sat on the mat", np.random.default_rng(10), confusion=0.3)
    kw = {"beam_width": 16, "language_model": lm, "mode": mode}
    first = CTCDecoder(backend="native", **kw).decode(x, nbest=4)
    before = info.lookups
    assert CTCDecoder(backend="native", **kw).decode(x, nbest=4) == first
    assert before > 0 and info.lookups == before  # the second pass hit the cache only
    assert first == CTCDecoder(backend="python", **kw).decode(x, nbest=4)
    # A model that is not the kenlm package's (here a wrapper) is asked through Python.
    wrapped = KenLM(lm_path)
    wrapped.model = type("Wrapped", (), {"__getattr__": lambda self, n: getattr(lm.model, n)})()
    assert not wrapped.native_info().direct
    kw["language_model"] = wrapped
    assert CTCDecoder(backend="native", **kw).decode(x, nbest=4) == first
    # The core holds the C++ model it scores with: dropping Python's does not free it.
    lm.model = None
    gc.collect()
    kw["language_model"] = lm
    assert CTCDecoder(backend="native", **kw).decode(x, nbest=4) == first


def test_empty_input_gives_empty_result():
    result = CTCDecoder().decode(np.zeros((0, len(ENGLISH_CHARS)), np.float32))
    assert result.text == "" and result.words == () and result.frames == 0


@pytest.mark.parametrize(
    "logits, error, match",
    [
        (np.zeros((5,), np.float32), ValueError, "shape"),
        (np.zeros((2, 5, 29), np.float32), ValueError, "shape"),
        (np.zeros((5, 29), np.float16), TypeError, "float32 or float64, got float16"),
        (np.zeros((5, 28), np.float32), ValueError, "28 classes but the vocabulary has 29"),
        (np.full((5, 29), np.nan, np.float32), ValueError, "NaN"),
        (np.full((5, 29), np.inf, np.float32), ValueError, r"\+inf"),
        (np.full((5, 29), -np.inf, np.float32), ValueError, "-inf for every token"),
        ([[0.0] * 29], TypeError, "numpy array or torch tensor"),
    ],
)
def test_bad_logits_are_clear_errors(logits, error, match):
    with pytest.raises(error, match=match):
        CTCDecoder().decode(logits)


def test_bad_language_models_and_vocabularies(tmp_path):
    with pytest.raises(LMError, match="not found"):
        CTCDecoder(language_model=tmp_path / "missing.arpa")
    corrupt = tmp_path / "corrupt.arpa"
    corrupt.write_text("\\data\\\nngram 1=2\n\n\\1-grams:\n-1.0\tthe\n")
    with pytest.raises(LMError, match="cannot load"):
        CTCDecoder(language_model=corrupt)
    binary = tmp_path / "lm.bin"
    binary.write_bytes(b"mmap lm http://kheafield.com/code format version 5\0" + b"\0" * 64)
    with pytest.raises(LMError):
        CTCDecoder(language_model=binary)
    with pytest.raises(VocabularyError, match="no blank"):
        Vocabulary.from_tokens(["a", "b", "|"], blank="<pad>")
    with pytest.raises(VocabularyError, match="delimiter"):
        Vocabulary(("<b>", "a", "b"), 0)
    with pytest.raises(VocabularyError, match="outside"):
        Vocabulary(("<b>", "|"), 5)
    with pytest.raises(ValueError, match="beam_width"):
        CTCDecoder(beam_width=0)


def test_seed_api_works_as_written(lm_path):
    decoder = CTCDecoder(blank_id=0, beam_width=10, language_model=str(lm_path))
    x = emissions("the cat sat on the mat", np.random.default_rng(11))
    assert decoder.decode(x).text == "the cat sat on the mat"


def test_error_rates():
    assert wer(["the cat sat"], ["the cat sat"]) == 0
    assert wer(["the cat sat", "a b"], ["the bat", "a b c"]) == pytest.approx(3 / 5)
    assert cer(["abc"], ["abd"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        wer(["a"], [])


# -- the compiled core against the Python reference ------------------------------

native = pytest.mark.skipif(
    not native_available(),
    reason="compiled decoder core not built",
)


@native
@pytest.mark.parametrize("seed", range(6))
def test_native_core_is_identical_to_python(lm, seed):
    rng = np.random.default_rng(100 + seed)
    text = " ".join(rng.choice(SENTENCES, 2))
    x = emissions(text, rng, confusion=0.3, noise=1.5)
    knobs = [
        {},
        {"beam_width": 3, "top_k": 3},
        {"blank_skip_logp": None, "token_min_logp": -8.0},
        {"beam_prune_logp": -4.0, "alpha": 1.2, "beta": -0.5},
    ][seed % 4]
    hotwords = [None, ["cat", ("sea shore", 2.0), "zebra"], [f"w{i}" for i in range(200)]][seed % 3]
    for use_lm in (False, True):
        kw = {"beam_width": 16, "language_model": lm if use_lm else None, **knobs}
        assert_backends_agree(kw, x, hotwords, rng)


@native
def test_native_bpe_vocabulary_matches_python():
    pieces = ["<blank>", "\u2581the", "\u2581c", "at", "\u2581s", "\u2581on", "\u2581m", "\u2581"]
    vocab = Vocabulary(tuple(pieces), 0, kind="bpe")
    rng = np.random.default_rng(1)
    x = rng.normal(0, 2, (60, len(pieces))).astype(np.float32)
    results = [CTCDecoder(vocab, backend=b).decode(x, nbest=4) for b in ("python", "native")]
    assert results[0] == results[1]


# -- closed grammars (command-and-control) ----------------------------------------

COMMANDS = ["turn on the light", "turn off the light", "open the door", "close the door",
            "yes", "no", "stop", "go back"]  # fmt: skip


def test_a_grammar_recovers_commands_the_free_search_misspells():
    """Noisy emissions of each command: the free search spells most of them
    wrong, the grammar gets every one, in any chunking, with partials that
    start a command and words timed in order."""
    rng = np.random.default_rng(7)
    free = right = 0
    decoder = CTCDecoder(beam_width=16)
    for trial in range(24):
        said = COMMANDS[trial % len(COMMANDS)]
        x = emissions(said, rng, confusion=0.5, noise=2.0)
        stream = decoder.begin(grammar=COMMANDS, time_offset=1.0)
        partials = [stream.step(c) for c in np.array_split(x, 4)]
        assert all(any(c.startswith(p) for c in COMMANDS) for p in partials)
        streamed = stream.end(nbest=3)
        whole = decoder.decode(x, grammar=COMMANDS, nbest=3)
        assert (whole.text, whole.score, whole.nbest) == (streamed.text, streamed.score,
                                                          streamed.nbest)  # fmt: skip
        assert whole.nbest[0] == (whole.text, whole.score) and len(whole.nbest) <= 3
        assert [s for _, s in whole.nbest] == sorted((s for _, s in whole.nbest), reverse=True)
        words = streamed.words
        assert [w.word for w in words] == streamed.text.split()
        assert all(1.0 <= w.start < w.end <= 1.0 + len(x) * 0.04 + 1e-9 for w in words)
        assert all(a.end <= b.start + 1e-9 for a, b in zip(words, words[1:]))
        right += whole.text == said
        free += decoder.decode(x).text == said
    assert right == 24 and free <= 6


def test_a_grammar_scores_each_phrase_exactly_as_ctc_does():
    """log P(phrase) = the CTC probability of its letters, with or without the
    optional delimiter before and after (torch's ctc_loss as the reference)."""
    rng = np.random.default_rng(11)
    x = emissions("go back", rng, confusion=0.4, noise=1.5)
    logp = torch.log_softmax(torch.from_numpy(x).double(), dim=1)
    search = GrammarSearch(Grammar.parse(COMMANDS), ENGLISH_CHARS)
    search.advance(logp.numpy())
    ids = {t: i for i, t in enumerate(ENGLISH_CHARS.tokens)}
    for phrase, score in zip(COMMANDS, search.scores()):
        core = [ids["|" if c == " " else c] for c in phrase]
        variants = [core, [1, *core], [*core, 1], [1, *core, 1]]
        losses = [
            torch.nn.functional.ctc_loss(
                logp[:, None],
                torch.tensor([v]),
                [len(x)],
                [len(v)],
                reduction="sum",
                zero_infinity=False,
            )  # fmt: skip
            for v in variants
        ]
        expected = torch.logsumexp(-torch.stack(losses), 0).item()
        assert score == pytest.approx(expected, abs=1e-9), phrase


def test_a_grammar_result_is_a_phrase_nothing_or_unk():
    rng = np.random.default_rng(3)
    decoder = CTCDecoder()
    for text in ["the cat sat on the mat", "yes", "go", "turn on the"]:
        x = emissions(text, rng, confusion=0.2)
        result = decoder.decode(x, grammar=COMMANDS, nbest=5)
        assert result.text in COMMANDS or (result.text, result.words) == ("", ())
        assert all(t in COMMANDS for t, _ in result.nbest)
    silence = np.log(np.full((20, len(ENGLISH_CHARS)), 1e-6, np.float32))
    silence[:, 0] = 0.0
    assert decoder.decode(silence, grammar=COMMANDS).text == ""  # nothing said
    # With "[unk]": other speech is reported as such, the commands still win.
    with_unk = [*COMMANDS, "[unk]"]
    other = emissions("the quick brown fox jumps over the lazy dog", rng, confusion=0.2)
    assert decoder.decode(other, grammar=COMMANDS).text in COMMANDS  # forced
    assert decoder.decode(other, grammar=with_unk).text == "[unk]"
    said = emissions("close the door", rng, confusion=0.3, noise=1.5)
    assert decoder.decode(said, grammar=with_unk).text == "close the door"


def test_a_sequence_grammar_reads_digit_strings():
    """grammar_sequence: several phrases in a row (here digits), by the Viterbi
    path through the phrase loop; the free search misspells them."""
    digits = "zero one two three four five six seven eight nine".split()
    grammar = Grammar.parse(digits, sequence=True)
    rng = np.random.default_rng(1)
    decoder = CTCDecoder()
    right = free = 0
    for _ in range(12):
        said = " ".join(rng.choice(digits, rng.integers(1, 6)))
        x = emissions(said, rng, confusion=0.5, noise=2.0)
        stream = decoder.begin(grammar=grammar)
        partials = [stream.step(c) for c in np.array_split(x, 5)]
        streamed, whole = stream.end(), decoder.decode(x, grammar=grammar)
        assert (streamed.text, streamed.score) == (whole.text, whole.score)
        assert [w.word for w in whole.words] == whole.text.split()
        assert all(a.end <= b.start + 1e-9 for a, b in zip(whole.words, whole.words[1:]))
        assert all(set(p.split()[:-1]) <= set(digits) for p in partials)
        right += whole.text == said
        free += decoder.decode(x).text == said
    assert right == 12 and free <= 2
    # One command said: the same answer as the one-phrase grammar.
    x = emissions("close the door", rng, confusion=0.3, noise=1.5)
    one = decoder.decode(x, grammar=COMMANDS).text
    assert decoder.decode(x, grammar=Grammar.parse(COMMANDS, sequence=True)).text == one


def test_a_grammar_that_cannot_be_spelled_is_refused():
    decoder = CTCDecoder()
    for phrases, message in [
        ([], "no phrases"),
        (["[unk]"], "no phrases"),
        (["yes", "  "], "empty"),
        (["caf\u00e9"], "cannot spell"),
        (["room 101"], "cannot spell"),
        (["x" * 201], "longer than"),
    ]:
        with pytest.raises(GrammarError, match=message):
            decoder.begin(grammar=phrases)
    # The limit on phrases is the caller's (a server's, from its protocol): none by default.
    many = [f"word {'a' * (i % 9)}b{i // 9 * 'c'}" for i in range(1001)]
    assert len(Grammar.parse(many)) == 1001
    with pytest.raises(GrammarError, match="has 1001 phrases; at most 1000"):
        Grammar.parse(many, max_phrases=1000)
    with pytest.raises(ValueError, match="do not combine"):
        decoder.begin(hotwords=["yes"], grammar=["yes", "no"])
    bpe = Vocabulary(("<blank>", "\u2581ye", "s", "\u2581no"), 0, kind="bpe")
    with pytest.raises(GrammarError, match="character vocabulary"):
        CTCDecoder(bpe).begin(grammar=["yes", "no"])


def test_backend_choice():
    assert CTCDecoder(backend="python").backend == "python"
    with pytest.raises(ValueError, match="backend"):
        CTCDecoder(backend="cuda")


def test_decoder_presets_and_config_reach_the_search():
    from dsstream.decoding import DECODER_PRESETS, DecoderConfig

    widths = [DECODER_PRESETS[n].beam_width for n in ("fast", "balanced", "accurate")]
    assert widths == sorted(widths) and len(set(widths)) == 3
    tuned = DecoderConfig.preset("balanced", alpha=0.65, beta=2.5)
    assert (tuned.beam_width, tuned.alpha, tuned.beta) == (64, 0.65, 2.5)
    with pytest.raises(ValueError, match="fast, balanced, accurate"):
        DecoderConfig.preset("quick")
    assert CTCDecoder(config=tuned).config == tuned  # a config is not overridden by defaults
    assert CTCDecoder(config=tuned, beam_width=8).config.beam_width == 8  # keywords win
    assert CTCDecoder().config.beam_width == 10


def test_missing_native_core_falls_back_with_one_warning(monkeypatch):
    import dsstream.decoding.decoder as dec

    monkeypatch.setattr(dec, "native_available", lambda: False)
    monkeypatch.setattr(dec, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="pure-Python"):
        assert CTCDecoder().backend == "python"
    with pytest.raises(RuntimeError, match="not built"):
        CTCDecoder(backend="native")
    x = emissions("fallback works", np.random.default_rng(0))
    assert CTCDecoder().decode(x).text == "fallback works"


@pytest.mark.parametrize("backend", ["python", "auto"])
def test_step_batch_over_many_streams_equals_stepping_each(lm, backend):
    rng = np.random.default_rng(12)
    mats = [emissions(t, rng, confusion=0.2) for t in SENTENCES[:8]]
    decoder = CTCDecoder(beam_width=8, language_model=lm, backend=backend)
    streams = [decoder.begin() for _ in mats]
    solo = [decoder.begin() for _ in mats]
    for part in range(3):
        chunks = [np.array_split(m, 3)[part] for m in mats]
        batched = decoder.step_batch(streams, chunks)
        assert batched == [s.step(c) for s, c in zip(solo, chunks)]
    assert [s.end() for s in streams] == [s.end() for s in solo]
    with pytest.raises(ValueError, match="twice"):
        decoder.step_batch([streams[0], streams[0]], [mats[0][:1], mats[0][:1]])


FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "lm"


@pytest.mark.parametrize("kind", ["probing", "trie"])
def test_kenlm_binary_models_decode_like_their_arpa(kind):
    binary = FIXTURES / f"tiny.{kind}.bin"
    arpa_lm, bin_lm = KenLM(FIXTURES / "tiny.arpa"), KenLM(binary)
    assert bin_lm.vocab == arpa_lm.vocab  # from the .vocab sidecar
    rng = np.random.default_rng(13)
    for text in ["the cat sat on the mat", "a dog met the lazy fox"]:
        x = emissions(text, rng, confusion=0.3)
        kw = {"beam_width": 12, "alpha": 0.8}
        a = CTCDecoder(language_model=arpa_lm, **kw).decode(x, nbest=3)
        b = CTCDecoder(language_model=bin_lm, **kw).decode(x, nbest=3)
        assert a.text == b.text
        # ARPA keeps 7 digits, the binary stores float32: scores agree closely.
        assert a.score == pytest.approx(b.score, abs=1e-3)


def test_binary_lm_without_unigrams_is_a_clear_error(tmp_path):
    import shutil

    lone = tmp_path / "lone.bin"
    shutil.copy(FIXTURES / "tiny.probing.bin", lone)
    with pytest.raises(LMError, match="unigrams"):
        KenLM(lone)
    assert KenLM(lone, unigrams=["cat", "dog"]).vocab == {"cat", "dog"}


def test_word_times_stay_in_order_when_a_peak_moves_past_the_next_token():
    # Peaks [5, 3, 6]: "i" peaked after "t" was emitted; times are made monotonic.
    from dsstream.decoding.search import word_spans

    parts = [(False, ""), (True, "i"), (False, "t"), (True, "a")]
    words = word_spans(parts, ([1, 2, 3], [5, 3, 6], [-0.1, -0.2, -0.3]))
    assert [(w, f) for w, f, _ in words] == [("it", [3, 3]), ("a", [6])]


def test_decoders_of_one_lm_file_share_one_model_until_the_file_changes(tmp_path):
    import shutil

    from dsstream.decoding.lm import KenLM

    path = tmp_path / "lm.arpa"
    shutil.copy(FIXTURES / "tiny.arpa", path)
    a, b = CTCDecoder(language_model=path), CTCDecoder(language_model=str(path), beam_width=4)
    assert a.lm is b.lm is KenLM.shared(path)
    assert CTCDecoder(language_model=KenLM(path)).lm is not a.lm  # an explicit model is its own
    text = path.read_text()
    path.write_text(text.replace("\n\\end\\", "\n\n\\end\\"))  # another file at that path
    assert CTCDecoder(language_model=path).lm is not a.lm
    # The old version is no longer held for that path (a reloading server's LM).
    from dsstream.decoding.lm import _SHARED

    assert [k for k in _SHARED if k[0] == str(path.resolve())] == [
        (str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns)
    ]
