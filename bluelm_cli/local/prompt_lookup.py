"""Prompt-lookup drafts for speculative decoding: the tokens that followed the last occurrence of the text's
final n-gram, in the prompt or the answer so far (as transformers' `prompt_lookup_num_tokens` and vLLM's
ngram speculator do). Answers that quote, summarise or edit the prompt repeat long runs of it; the model
then checks a whole run in one forward instead of one forward per token.

The index maps every n-gram to where its latest earlier occurrence is followed, and grows by one entry per
n per token: a lookup costs a few dict reads however long the context, so a turn where nothing matches pays
next to nothing for it.
"""

from __future__ import annotations

from collections.abc import Iterable

# Longest and shortest n-grams matched (the longest match wins); drafts of at most this many tokens.
MAX_NGRAM = 3
MIN_NGRAM = 2
MAX_DRAFT_TOKENS = 8


class NgramLookup:
    def __init__(self, tokens: Iterable[int], *, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> None:
        self.tokens: list[int] = []
        self._sizes = range(max_ngram, min_ngram - 1, -1)
        # (n-gram) -> position just after its latest occurrence that is followed by at least one token.
        self._follows: dict[tuple[int, ...], int] = {}
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        tokens = self.tokens
        tokens.append(token)
        end = len(tokens) - 1  # grams ending just before the new token are now followed by it
        for n in self._sizes:
            if end >= n:
                self._follows[tuple(tokens[end - n : end])] = end

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.append(token)

    def draft(self, limit: int = MAX_DRAFT_TOKENS) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the longest matching final n-gram."""
        tokens = self.tokens
        if limit <= 0:
            return []
        for n in self._sizes:
            if len(tokens) <= n:
                continue
            start = self._follows.get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start : start + limit]
        return []


class DraftBudget:
    """How many tokens to draft at the next step, from how the last drafts fared.

    A verify forward over 1 + k tokens costs more than a one-token step (little on a GPU, whose step is bound by
    reading the weights; measured 2-3x for k = 8 on a CPU), so wrong drafts must stay rare: a draft grows by two
    after it was accepted whole and shrinks to what was accepted plus one otherwise (as transformers' assisted
    generation does), and after a draft of which nothing was accepted, drafting pauses for 1, 2, 4 … up to
    MAX_PAUSE steps, so that text that never repeats costs at most one short wasted verify per MAX_PAUSE tokens.
    """

    MAX_PAUSE = 16

    def __init__(self, most: int = MAX_DRAFT_TOKENS) -> None:
        self.most = most
        self.length = most
        self._pause = 0  # the current pause's length
        self._waiting = 0  # steps left to wait before drafting again

    def limit(self) -> int:
        if self._waiting:
            self._waiting -= 1
            return 0
        return self.length

    def update(self, drafted: int, accepted: int) -> None:
        if not drafted:
            return
        if accepted == drafted:
            self.length = min(self.most, self.length + 2)
        else:
            self.length = max(1, accepted + 1)
        if accepted == 0:
            self._pause = min(self.MAX_PAUSE, max(1, 2 * self._pause))
            self._waiting = self._pause
        else:
            self._pause = 0
