"""Hotword boosting with a character trie: the cost of a step does not depend
on how many hotwords there are.

A beam carries ``(node, anchor, banked)``: its position in the trie, the
credit already banked inside the current match, and the bonus of completed
hotwords.  Credit accrues per character while a hotword is being spelled
(``score(node)`` grows linearly to the phrase's full bonus), so a hotword
competes while it is still partial; if the spelling leaves the trie, the
in-progress credit is taken back.  Matches start only at word starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["HotwordTrie", "HotwordState"]

ROOT = 0


@dataclass(frozen=True, slots=True)
class HotwordState:
    node: int = ROOT  # trie position of the current match (ROOT: none)
    anchor: float = 0.0  # score(node) already banked in this match
    banked: float = 0.0  # bonus of hotwords completed so far

    def bonus(self, trie: HotwordTrie) -> float:
        """Banked bonus plus the in-progress credit."""
        return self.banked + trie.score[self.node] - self.anchor


class HotwordTrie:
    """Phrases (words separated by single spaces) with their boosts.

    ``boost`` is a log-score bonus per word: completing a phrase of n words
    adds ``n * boost``.
    """

    def __init__(self, hotwords: Sequence[tuple[str, float]]) -> None:
        self.children: list[dict[str, int]] = [{}]
        self.score: list[float] = [0.0]
        self.terminal: list[bool] = [False]
        self.words: set[str] = set()
        for phrase, boost in hotwords:
            self._add(" ".join(phrase.lower().split()), float(boost))

    def __len__(self) -> int:
        return sum(self.terminal)

    def _add(self, phrase: str, boost: float) -> None:
        if not phrase:
            return
        self.words.update(phrase.split())
        total = boost * len(phrase.split())
        node = ROOT
        for depth, ch in enumerate(phrase, 1):
            nxt = self.children[node].get(ch)
            if nxt is None:
                nxt = len(self.children)
                self.children[node][ch] = nxt
                self.children.append({})
                self.score.append(float("-inf"))
                self.terminal.append(False)
            credit = total * depth / len(phrase)
            # Shared prefixes take the largest credit of the phrases through them.
            self.score[nxt] = max(self.score[nxt], credit)
            node = nxt
        self.terminal[node] = True

    def char(self, state: HotwordState, ch: str, word_start: bool) -> HotwordState:
        """Advance by one character of a word."""
        if state.node == ROOT:
            nxt = self.children[ROOT].get(ch) if word_start else None
            return state if nxt is None else HotwordState(nxt, 0.0, state.banked)
        nxt = self.children[state.node].get(ch)
        if nxt is not None:
            return HotwordState(nxt, state.anchor, state.banked)
        # Left the trie: drop the in-progress credit; a new word may start a match.
        nxt = self.children[ROOT].get(ch, ROOT) if word_start else ROOT
        return HotwordState(nxt, 0.0, state.banked)

    def word_end(self, state: HotwordState) -> HotwordState:
        """A word boundary: bank a completed phrase, or continue into the next word."""
        node, anchor, banked = state.node, state.anchor, state.banked
        if node == ROOT:
            return state
        if self.terminal[node]:
            banked += self.score[node] - anchor
            anchor = self.score[node]
        nxt = self.children[node].get(" ")
        if nxt is not None:
            return HotwordState(nxt, anchor, banked)
        return HotwordState(ROOT, 0.0, banked)

    def finish(self, state: HotwordState) -> HotwordState:
        """End of utterance: an unfinished match gives its credit back."""
        state = self.word_end(state)
        return HotwordState(ROOT, 0.0, state.banked)

    def in_match(self, state: HotwordState) -> bool:
        return state.node != ROOT
