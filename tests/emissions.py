"""Reproducible synthetic CTC emissions with realistic error patterns.

A transcript is laid out as frames (each token held for a few frames, blanks
between), then corrupted the way acoustic models err: confusable letters get
probability mass (c/k, e/a, i/e, s/z, m/n...), some frames are noisy, and the
blank dominates between tokens.  Used by the decoder tests and benchmarks.
"""

from __future__ import annotations

import numpy as np

from dsstream.decoding import ENGLISH_CHARS, Vocabulary

CONFUSABLE = {
    "a": "eo", "e": "ai", "i": "ey", "o": "au", "u": "o", "c": "ks", "k": "c", "s": "zc",
    "z": "s", "m": "n", "n": "m", "b": "p", "p": "b", "d": "t", "t": "d", "g": "k",
    "v": "f", "f": "v", "w": "v", "y": "i", "r": "l", "l": "r",
}  # fmt: skip


def layout(text: str, vocab: Vocabulary, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(token id, first frame) for each token, with 1-3 blanks between tokens."""
    index = {t: i for i, t in enumerate(vocab.tokens)}
    tokens = [index[vocab.delimiter if ch == " " else ch] for ch in text]
    out, frame = [], int(rng.integers(1, 4))
    for tok in tokens:
        out.append((tok, frame))
        frame += int(rng.integers(1, 3)) + int(rng.integers(1, 4))
    return out


def emissions(
    text: str,
    rng: np.random.Generator,
    vocab: Vocabulary = ENGLISH_CHARS,
    confusion: float = 0.0,
    noise: float = 0.5,
) -> np.ndarray:
    """Log-probabilities ``[frames, vocab]`` (float32) for ``text``.

    ``confusion``: chance that a letter's frames favour a confusable letter
    (an error greedy decoding makes, which an LM can fix).
    """
    spans = layout(text, vocab, rng)
    frames = spans[-1][1] + 4 if spans else 4
    index = {t: i for i, t in enumerate(vocab.tokens)}
    logits = rng.normal(0.0, noise, (frames, len(vocab)))
    logits[:, vocab.blank_id] += 5.0
    ends = [f for _, f in spans[1:]] + [frames - 1]
    for (tok, start), nxt in zip(spans, ends):
        hold = max(1, min(2, nxt - start - 1))
        ch = vocab.tokens[tok]
        rival = None
        if ch in CONFUSABLE and rng.random() < confusion:
            rival = index[rng.choice(list(CONFUSABLE[ch]))]
        for t in range(start, start + hold):
            logits[t, vocab.blank_id] -= 5.0
            logits[t, tok] += 7.0
            if rival is not None:
                logits[t, rival] += 7.0 + rng.uniform(0.1, 1.0)  # the rival wins greedy
    logits -= np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return logits.astype(np.float32)


def assert_backends_agree(kw: dict, x: np.ndarray, hotwords, rng: np.random.Generator) -> None:
    """The compiled core and the Python reference, built with ``kw``, give the
    same results on ``x``: whole, and streamed in random chunks."""
    from dsstream.decoding import CTCDecoder

    ref, fast = CTCDecoder(backend="python", **kw), CTCDecoder(backend="native", **kw)
    assert fast.decode(x, hotwords=hotwords, nbest=8) == ref.decode(x, hotwords=hotwords, nbest=8)
    cuts = np.sort(rng.choice(np.arange(1, len(x)), size=5, replace=False))
    a, b = ref.begin(hotwords=hotwords), fast.begin(hotwords=hotwords)
    for chunk in np.split(x, cuts):
        assert a.step(chunk) == b.step(chunk)
    assert a.end(3) == b.end(3)
