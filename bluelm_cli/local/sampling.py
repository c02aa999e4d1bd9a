"""Choosing the next token on the logits' device, with the state that lasts a whole answer kept in buffers.

The values are those of transformers' processors in `generate()`'s order (repetition penalty, temperature,
top-k, top-p), then one draw as `torch.multinomial` draws it, so greedy and seeded answers are what they were
with `LogitsProcessorList`; what changes is the work per token:
- no `inspect.signature` per processor per call (what `LogitsProcessorList.__call__` does, tens of µs each);
- the repetition penalty reads a presence mask over the vocabulary, updated with each new token on the device,
  instead of gathering from and scattering into a history that grows every step (fixed shapes: capturable);
- the processors work in place on one float copy of the logits, and the draw's noise has its own buffer.
Nothing here reads a tensor on the host: the caller's one read of the chosen token is the step's only sync.
"""

from __future__ import annotations

import torch

from bluelm_cli.core.settings import SamplingSettings


class TokenSampler:
    """The next token from a [1, vocab] logits row, as a [1] tensor on the logits' device.

    `observe(ids)` marks the prompt for the repetition penalty; `__call__` marks each token it chooses. The
    logits passed in may be overwritten (every runner returns a fresh row per step).
    """

    def __init__(self, settings: SamplingSettings, vocab_size: int, device: torch.device, stop_ids: torch.Tensor,
                 generator: torch.Generator | None = None) -> None:
        self.greedy = settings.greedy
        self.penalty = settings.repetition_penalty
        self.temperature = settings.temperature
        self.top_k = settings.top_k
        self.top_p = settings.top_p
        self.stop_ids = stop_ids
        self.generator = generator
        self.vocab_size = vocab_size
        # One slot past the vocabulary takes ids beyond it (padding rows), as transformers' penalty clamps them.
        self._seen = torch.zeros((1, vocab_size + 1), dtype=torch.bool, device=device) if self.penalizes else None
        self._noise: torch.Tensor | None = None

    @property
    def penalizes(self) -> bool:
        return self.penalty != 1.0

    @property
    def processes(self) -> bool:
        """Whether the scores differ from the raw logits (greedy without a penalty is a plain argmax)."""
        return self.penalizes or not self.greedy

    def observe(self, ids: torch.Tensor) -> None:
        """Mark ids ([1, n] or [1], on the device) as already in the text, for the repetition penalty."""
        if self._seen is not None:
            self._seen.scatter_(1, ids.view(1, -1).clamp(max=self.vocab_size), True)

    def observe_id(self, token: int) -> None:
        """Mark one id known on the host (a fill on the device, no read)."""
        if self._seen is not None:
            self._seen[0, min(token, self.vocab_size)] = True

    def scores(self, logits: torch.Tensor, suppress_stops: bool = False) -> torch.Tensor:
        """The processed scores of one row ([1, vocab]): stops masked if asked, then penalty, temperature, top-k, top-p."""
        if suppress_stops:
            logits.index_fill_(-1, self.stop_ids, float("-inf"))
        if not self.processes:
            return logits
        scores = logits.float()
        if self._seen is not None:
            # transformers' RepetitionPenaltyLogitsProcessor: a seen token's score is multiplied by the penalty when
            # negative, divided by it otherwise (the same float operations, so the same values).
            penalized = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
            scores = torch.where(self._seen[:, : scores.shape[-1]], penalized, scores)
        if self.greedy:
            return scores
        if self.temperature != 1.0:
            scores.div_(self.temperature)  # TemperatureLogitsWarper
        if self.top_k:
            # TopKLogitsWarper: below the k-th largest score is removed.
            top_k = min(self.top_k, scores.shape[-1])
            scores.masked_fill_(scores < torch.topk(scores, top_k)[0][..., -1, None], float("-inf"))
        if self.top_p < 1.0:
            # TopPLogitsWarper: the smallest scores whose probabilities add up to at most 1 - top_p are removed,
            # never the largest one.
            sorted_logits, sorted_indices = torch.sort(scores, descending=False)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            sorted_to_remove = cumulative <= (1 - self.top_p)
            sorted_to_remove[..., -1:] = 0
            scores.masked_fill_(sorted_to_remove.scatter(1, sorted_indices, sorted_to_remove), float("-inf"))
        return scores

    def __call__(self, logits: torch.Tensor, suppress_stops: bool = False) -> torch.Tensor:
        scores = self.scores(logits, suppress_stops)
        if self.greedy:
            token = scores.argmax(dim=-1)
        else:
            probabilities = torch.softmax(scores, dim=-1)  # float32 already
            # torch.multinomial's own draw for one sample (argmax of p / Exp(1) noise, the same random stream),
            # without its two validity checks, each a device-to-host sync.
            if self._noise is None or self._noise.shape != probabilities.shape:
                self._noise = torch.empty_like(probabilities)
            self._noise.exponential_(1, generator=self.generator)
            token = probabilities.div_(self._noise).argmax(dim=-1)
        if self._seen is not None:
            self._seen.index_fill_(1, token, True)  # a chosen id is inside the vocabulary: no clamp needed
        return token
