"""The n-gram LM builder: hand-computed Kneser-Ney, normalization to one,
pruning, KenLM compatibility, text normalization and the CLI."""

import itertools
import math
import subprocess
import sys
from pathlib import Path

import kenlm
import numpy as np
import pytest

from dsstream.lm import build_lm, normalize_sentence, split_sentences, write_arpa
from dsstream.lm.builder import Discounts, _discounts
from dsstream.lm.normalize import spell_number


def test_hand_computed_bigram_model(tmp_path):
    # Corpus "a b" / "b" -> <s> a b </s>, <s> b </s>.
    # Adjusted unigram counts (distinct left contexts): a 1, b 2 (a, <s>), </s> 1.
    # Too few counts-of-counts for the estimate -> fallback discounts .5, 1, 1.5.
    # Unigrams: total 4, discounted mass .5 + 1 + .5 = 2, four predicted words
    # (<unk> </s> a b), so the uniform share is (2/4)/4 = .125:
    #   p(a) = .5/4 + .125 = .25   p(b) = 1/4 + .125 = .375
    #   p(</s>) = .5/4 + .125 = .25   p(<unk>) = .125
    # Bigrams (raw counts): <s> a 1, <s> b 1, a b 1, b </s> 2.
    #   gamma(<s>) = (.5 + .5)/2 = .5:  p(a|<s>) = .5/2 + .5*.25 = .375
    #                                   p(b|<s>) = .5/2 + .5*.375 = .4375
    #   gamma(a) = .5/1:  p(b|a) = .5 + .5*.375 = .6875
    #   gamma(b) = 1/2:   p(</s>|b) = 1/2 + .5*.25 = .625
    model = build_lm([["a", "b"], ["b"]], order=2)
    assert model.discounts[0] == Discounts(0.5, 1.0, 1.5, fallback=True)
    expected_1 = {("a",): 0.25, ("b",): 0.375, ("</s>",): 0.25, ("<unk>",): 0.125, ("<s>",): 0}
    expected_2 = {("<s>", "a"): 0.375, ("<s>", "b"): 0.4375, ("a", "b"): 0.6875,
                  ("b", "</s>"): 0.625}  # fmt: skip
    assert model.probs[0] == pytest.approx(expected_1, abs=1e-15)
    assert model.probs[1] == pytest.approx(expected_2, abs=1e-15)
    assert model.backoffs[0] == pytest.approx({("<s>",): 0.5, ("a",): 0.5, ("b",): 0.5})
    path = tmp_path / "hand.arpa"
    write_arpa(model, path)
    lm = kenlm.Model(str(path))
    # KenLM reads what we wrote: p(b | <s> a) is listed, p(a | b) backs off.
    assert 10 ** lm.score("a b", bos=True, eos=True) == pytest.approx(
        0.375 * 0.6875 * 0.625, rel=1e-6
    )
    assert 10 ** lm.score("b a", bos=False, eos=False) == pytest.approx(
        0.375 * 0.5 * 0.25, rel=1e-6
    )


def test_discounts_follow_the_counts_of_counts():
    # n1=10, n2=5, n3=3, n4=2 -> Y = 10/20 = .5
    table = {(str(i),): c for i, c in enumerate([1] * 10 + [2] * 5 + [3] * 3 + [4] * 2)}
    d = _discounts(table)
    assert not d.fallback
    assert (d.d1, d.d2, d.d3) == pytest.approx((1 - 2 * 0.5 * 5 / 10, 2 - 3 * 0.5 * 3 / 5,
                                                3 - 4 * 0.5 * 2 / 3))  # fmt: skip


def _random_corpus(seed: int, sentences: int = 1500, size: int = 15) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(size)]
    zipf = 1 / np.arange(1, size + 1)
    zipf /= zipf.sum()
    return [[str(w) for w in rng.choice(words, size=rng.integers(1, 9), p=zipf)]
            for _ in range(sentences)]  # fmt: skip


def _kenlm_context_sums(lm, vocab, order):
    contexts = set()
    for n in range(order):
        contexts.update(itertools.product(vocab[:8] + ["<s>"], repeat=n))
    worst = 0.0
    for ctx in contexts:
        if "<s>" in ctx[1:]:
            continue
        state = kenlm.State()
        if ctx and ctx[0] == "<s>":
            lm.BeginSentenceWrite(state)
            rest = ctx[1:]
        else:
            lm.NullContextWrite(state)
            rest = ctx
        for w in rest:
            nxt = kenlm.State()
            lm.BaseScore(state, w, nxt)
            state = nxt
        total = sum(10 ** lm.BaseScore(state, w, kenlm.State()) for w in vocab)
        worst = max(worst, abs(total - 1))
    return worst


@pytest.mark.parametrize("order, prune", [(2, ()), (3, ()), (4, ()), (3, (0, 0, 1)),
                                          (4, (0, 1, 1, 2))])  # fmt: skip
def test_every_context_sums_to_one_through_kenlm(tmp_path, order, prune):
    # Enough rare n-grams at the top order for a real discount estimate.
    corpus = _random_corpus(order, size=15 if order > 2 else 200)
    model = build_lm(corpus, order, prune)
    assert not model.discounts[-1].fallback  # a real estimate, not the fallback
    path = tmp_path / "m.arpa"
    write_arpa(model, path)
    lm = kenlm.Model(str(path))
    assert lm.order == order
    vocab = sorted({w for s in corpus for w in s}) + ["</s>", "<unk>"]
    # ARPA stores 7 significant digits; KenLM computes in float32.
    assert _kenlm_context_sums(lm, vocab, order) < 2e-5
    if prune:
        full = build_lm(corpus, order)
        assert len(model.probs[-1]) < len(full.probs[-1])


def test_pruning_keeps_prefixes_and_suffixes_of_kept_ngrams():
    model = build_lm(_random_corpus(7), 4, (0, 2, 2, 1))
    for n in range(2, 5):
        for gram in model.probs[n - 1]:
            assert gram[:-1] in model.probs[n - 2] and gram[1:] in model.probs[n - 2]


def test_empty_corpus_and_bad_order():
    with pytest.raises(ValueError, match="empty"):
        build_lm([], 3)
    with pytest.raises(ValueError, match="order"):
        build_lm([["a"]], 0)


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Hello, World!", "hello world"),
        ("It's 5 o'clock.", "it's five o'clock"),
        (
            "In 1984, 3,000 people paid $2.50 each.",
            "in nineteen eighty four three thousand people paid two point five dollars each",
        ),
        ("The 21st century -- 40% more.", "the twenty first century forty percent more"),
        ("Mr. Darcy & Mrs. Bennet", "mister darcy and missus bennet"),
        ("Café “déjà vu” — naïve", "cafe deja vu naive"),
        ("'Quoted' words' ends", "quoted words ends"),
        ("...", ""),
    ],
)
def test_normalize_sentence(raw, normalized):
    assert normalize_sentence(raw) == normalized


def test_split_sentences_joins_wrapped_lines():
    text = "It was the best\nof times. It was the worst of\ntimes!\n\nChapter 2\n"
    assert list(split_sentences(text)) == [
        "It was the best of times.",
        "It was the worst of times!",
        "Chapter 2",
    ]
    assert spell_number("12", ordinal=True) == "twelfth"


def test_cli_lm_build(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("The cat sat.\nThe dog sat!\n\nA cat and 2 dogs sat on a mat.\n")
    exclude = tmp_path / "x.txt"
    exclude.write_text("the dog sat\n")
    out = tmp_path / "lm.arpa"
    result = subprocess.run(
        [sys.executable, "-m", "dsstream.cli", "lm", "build", str(corpus), "-o", str(out),
         "--order", "3", "--exclude", str(exclude), "--quiet"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "3-grams" in result.stdout
    lm = kenlm.Model(str(out))
    assert "two" in lm and "dogs" in lm and "cat" in lm
    assert "dog" not in lm  # only in the excluded sentence
    assert math.isfinite(lm.score("the cat sat"))


SHIPPED = Path(__file__).resolve().parent.parent / "samples" / "asr"


@pytest.mark.skipif(not (SHIPPED / "lm.bin").exists(), reason="no shipped binary LM")
def test_shipped_binary_lm_scores_as_its_arpa_and_is_served():
    from dsstream.decoding.lm import read_arpa_unigrams
    from dsstream.lm.binary import vocab_sidecar
    from dsstream.pipelines.defaults import asr_lm

    arpa, binary = SHIPPED / "lm.arpa", SHIPPED / "lm.bin"
    a, b = kenlm.Model(str(arpa)), kenlm.Model(str(binary))
    # The highest-order n-grams (exact hits), then random word strings (backoffs).
    grams, lines = [], iter(arpa.read_text(encoding="utf-8").splitlines())
    for line in lines:
        if line.startswith(f"\\{a.order}-grams:"):
            break
    for line in itertools.islice(lines, 3000):
        if "\t" in line:
            grams.append(line.split("\t")[1])
    words = vocab_sidecar(binary).read_text(encoding="utf-8").split()
    assert words == read_arpa_unigrams(arpa)
    rng = np.random.default_rng(0)
    grams += [" ".join(rng.choice(words, int(rng.integers(1, 6)))) for _ in range(3000)]
    for text in grams:
        assert list(a.full_scores(text)) == list(b.full_scores(text)), text
    assert asr_lm(SHIPPED.parent) == binary  # what a default server loads


def test_binary_conversion_without_kenlms_tool_says_how_to_get_it(tmp_path):
    from dsstream.lm.binary import write_binary

    with pytest.raises(FileNotFoundError, match="compile_query_only.sh"):
        write_binary(SHIPPED / "lm.arpa", tmp_path / "lm.bin", build_binary="no-such-tool")
