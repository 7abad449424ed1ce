"""CTC decoding: prefix beam search with KenLM fusion, hotwords and streaming."""

from dsstream.decoding.decoder import (
    ENGLISH_CHARS,
    CTCDecoder,
    DecodeResult,
    DecoderStream,
    GrammarStream,
    WordInfo,
    greedy_decode,
)
from dsstream.decoding.grammar import Grammar, GrammarError
from dsstream.decoding.hotwords import HotwordTrie
from dsstream.decoding.lexicon import Lexicon, LexiconError
from dsstream.decoding.lm import KenLM, LMError
from dsstream.decoding.search import DECODER_PRESETS, DecoderConfig
from dsstream.decoding.vocab import Vocabulary, VocabularyError

__all__ = [
    "CTCDecoder",
    "DecoderStream",
    "GrammarStream",
    "Grammar",
    "GrammarError",
    "DecodeResult",
    "DECODER_PRESETS",
    "DecoderConfig",
    "WordInfo",
    "Vocabulary",
    "VocabularyError",
    "ENGLISH_CHARS",
    "KenLM",
    "LMError",
    "HotwordTrie",
    "Lexicon",
    "LexiconError",
    "greedy_decode",
]
