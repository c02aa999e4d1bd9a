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

    def scores(self, logits: torch.Tensor, suppress_stops: bool = False, seen: torch.Tensor | None = None) -> torch.Tensor:
        """The processed scores of rows ([n, vocab]): stops masked if asked, then penalty, temperature, top-k, top-p.

        Every row is processed on its own; `seen` ([n, vocab + 1]) gives each row its own penalty mask (default:
        the sampler's, for every row)."""
        if suppress_stops:
            logits.index_fill_(-1, self.stop_ids, float("-inf"))
        if not self.processes:
            return logits
        scores = logits.float()
        if self._seen is not None:
            mask = self._seen if seen is None else seen
            # transformers' RepetitionPenaltyLogitsProcessor: a seen token's score is multiplied by the penalty when
            # negative, divided by it otherwise (the same float operations, so the same values).
            penalized = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
            scores = torch.where(mask[:, : scores.shape[-1]], penalized, scores)
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

    def speculate(self, rows: torch.Tensor, draft: torch.Tensor, suppressed: int = 0) -> torch.Tensor:
        """Settle the tokens of one verify forward, on the device: `rows` ([k + 1, vocab], may be overwritten) are the
        logits after the last token and after each of the k drafted tokens (`draft`, [k] on the device); the first
        `suppressed` rows cannot choose a stop (min_new_tokens).

        Returns [k + 2] ids: the count a of drafted tokens accepted, then the settled tokens: draft[:a] and one token
        more (rows past a + 1 are unspecified). The caller reads it in one go: the verify's only host sync. The
        tokens settled are marked for the repetition penalty, as one call per token would mark them.

        Greedy: a drafted token is accepted while it is the argmax, and the first other argmax (or the argmax after
        the whole draft) is the token more: the tokens plain greedy decoding picks.

        Sampled: speculative sampling (Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via
        Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative
        Sampling") with a deterministic draft, whose distribution q is one-hot on the drafted token d. With p a
        row's distribution after all processing, d is accepted with probability min(1, p(d) / q(d)) = p(d); on the
        first rejection the token more is drawn from max(p - q, 0) normalised, i.e. p with d removed; after the
        whole draft it is drawn from the last row's p. Every settled token then has exactly the distribution plain
        sampling gives it, given the tokens before it. Row i's p is what plain sampling would use there: its
        repetition penalty has also seen draft[:i], which are the tokens before it whenever row i is reached.
        """
        drafted = draft.view(-1)
        count = drafted.shape[0]
        positions = count + 1
        if suppressed:
            rows[:suppressed].index_fill_(-1, self.stop_ids, float("-inf"))
        seen = None
        if self._seen is not None:
            # Row i's penalty mask: the text so far and the drafted tokens before row i (all masks built at once).
            seen = self._seen.expand(positions, -1).clone()
            if count:
                row, column = torch.tril_indices(positions, count, offset=-1, device=rows.device)
                seen[row, drafted[column].clamp(max=self.vocab_size)] = True
        scores = self.scores(rows, False, seen)
        if self.greedy:
            choices = scores.argmax(dim=-1)
            accepted_each = choices[:count] == drafted
        else:
            probabilities = torch.softmax(scores, dim=-1)  # float32 already
            at_draft = probabilities[:count].gather(1, drafted.view(-1, 1)).view(-1)
            uniforms = torch.rand((count,), generator=self.generator, device=rows.device)
            accepted_each = _accept_drafts(at_draft, uniforms)
            _rejection_distribution(probabilities[:count], drafted)
            # One draw per row (the rejection's at each drafted row, the bonus at the last), as __call__ draws: the
            # argmax of p / Exp(1) noise, which needs no normalisation (the argmax of p / Z / noise is the same).
            noise = torch.empty_like(probabilities).exponential_(1, generator=self.generator)
            choices = probabilities.div_(noise).argmax(dim=-1)
        # Drafts count while every one before them was accepted.
        accepted = accepted_each.long().cumprod(dim=0).sum() if count else torch.zeros((), dtype=torch.long, device=rows.device)
        index = torch.arange(positions, device=rows.device)
        padded = torch.cat([drafted, choices[-1:]])
        settled = torch.where(index < accepted, padded, choices)
        if self._seen is not None:
            # The settled tokens (the first a + 1) are now in the text; the rest go to the spare column past the vocabulary.
            marked = torch.where(index <= accepted, settled, self.vocab_size)
            self._seen.scatter_(1, marked.view(1, -1), True)
        return torch.cat([accepted.view(1), settled])

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


def _accept_drafts(at_draft: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Whether each drafted token is accepted: with probability p(d) (uniforms in [0, 1); p(d) = 0 never is)."""
    return uniforms < at_draft


def _rejection_distribution(probabilities: torch.Tensor, drafted: torch.Tensor) -> None:
    """In place: each drafted row's p with its drafted token removed, max(p - q, 0) for a one-hot q (unnormalised)."""
    probabilities.scatter_(1, drafted.view(-1, 1), 0.0)
