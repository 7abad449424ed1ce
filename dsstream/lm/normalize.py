"""Text normalization to the acoustic model's vocabulary: lowercase a-z and
apostrophes, numbers spelled out, one sentence per line.

The same function normalizes LM training text, synthesis prompts and reference
transcripts, so all three agree on what a word is.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable, Iterator

__all__ = ["normalize_sentence", "split_sentences", "normalize_corpus", "spell_number"]

_ORDINAL = re.compile(r"\b(\d+)(st|nd|rd|th)\b", re.I)
_MONEY = re.compile(r"\$\s?(\d[\d,]*(?:\.\d+)?)")
_PERCENT = re.compile(r"(\d[\d,]*(?:\.\d+)?)\s?%")
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]*[A-Z0-9])")
_NOT_WORD = re.compile(r"[^a-z' ]+")
_SPACES = re.compile(r"\s+")
_ABBREVIATIONS = {
    "mr.": "mister", "mrs.": "missus", "dr.": "doctor", "st.": "saint", "jr.": "junior",
    "sr.": "senior", "no.": "number", "vs.": "versus", "etc.": "et cetera", "mt.": "mount",
}  # fmt: skip
_SYMBOLS = {"&": " and ", "+": " plus ", "=": " equals ", "@": " at "}


def spell_number(token: str, ordinal: bool = False) -> str:
    """Spell out a number: ``"1984"`` as a year, ``"1,200"``, ``"3.5"``, ordinals."""
    from num2words import num2words

    raw = token.replace(",", "")
    try:
        if ordinal:
            return str(num2words(int(raw), to="ordinal"))
        if "." in raw:
            return str(num2words(float(raw)))
        value = int(raw)
    except (ValueError, OverflowError):
        return " ".join(num2words(int(d)) for d in raw if d.isdigit())
    if 1100 <= value <= 2099 and len(raw) == 4 and "," not in token:
        return str(num2words(value, to="year"))
    return str(num2words(value))


def _ascii(text: str) -> str:
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def normalize_sentence(text: str) -> str:
    """One sentence of raw text to space-separated words over ``a-z'``."""
    text = _ascii(text)
    lowered = text.lower()
    for abbr, full in _ABBREVIATIONS.items():
        lowered = re.sub(rf"(?<![a-z]){re.escape(abbr)}", f" {full} ", lowered)
    text = lowered
    text = _MONEY.sub(lambda m: f" {spell_number(m.group(1))} dollars ", text)
    text = _PERCENT.sub(lambda m: f" {spell_number(m.group(1))} percent ", text)
    text = _ORDINAL.sub(lambda m: f" {spell_number(m.group(1), ordinal=True)} ", text)
    text = _NUMBER.sub(lambda m: f" {spell_number(m.group(0).rstrip('.,'))} ", text)
    for sym, word in _SYMBOLS.items():
        text = text.replace(sym, word)
    text = text.replace("-", " ")
    text = _NOT_WORD.sub(" ", text)
    words = [w.strip("'") for w in text.split()]
    return " ".join(w for w in words if w)


def split_sentences(text: str) -> Iterator[str]:
    """Split raw prose (hard-wrapped lines, blank-line paragraphs) into sentences."""
    for paragraph in re.split(r"\n\s*\n", text):
        flat = _SPACES.sub(" ", paragraph).strip()
        if flat:
            yield from (s for s in _SENTENCE_END.split(flat) if s.strip())


def normalize_corpus(lines: Iterable[str], prose: bool = True) -> Iterator[str]:
    """Normalized sentences of a corpus; ``prose=False`` takes one sentence per line."""
    if prose:
        text = "".join(lines)
        sentences: Iterable[str] = split_sentences(text)
    else:
        sentences = lines
    for sentence in sentences:
        normalized = normalize_sentence(sentence)
        if normalized:
            yield normalized
