"""Quiet-STaR at inference: the next-token prediction after a thought at every (or every selected) position,
one thought decoded on a KV cache (`think`, generation's step), and thoughts as text."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import NamedTuple, Optional

import torch

from quietstar.masks import GridStates, ThoughtGrid, at_positions
from quietstar.methods.quietstar.rollout import sample_categorical
from quietstar.methods.quietstar.where import Selection

class NextTokenLogits(NamedTuple):
    base: torch.Tensor  # (B, L, V) no-thought logits of x_{i+1} (final hidden states (B, L, d): next_token_states)
    mixed: torch.Tensor  # (B, n, P, V) talk-head-mixed logits after a thought (P = L: every position)
    mix_weight: torch.Tensor  # (B, n, P)
    thoughts: torch.Tensor  # (B, n, P, T-3)
    selection: Optional[Selection] = None  # thought.where's P thinking positions (None: all L)

    def thinking(self) -> torch.Tensor:
        """(B, L) bool: the positions whose prediction follows a thought."""
        B, L = self.base.shape[:2]
        if self.selection is None:
            return torch.ones(B, L, dtype=torch.bool, device=self.base.device)
        return torch.zeros(B, L, dtype=torch.bool, device=self.base.device).scatter_(
            1, self.selection.positions, self.selection.valid)

    def full(self) -> "NextTokenLogits":
        """The prediction used at every position (P = L): after a thought at the thinking positions, the base
        prediction elsewhere (mix weight 0, thought ids 0 there)."""
        if self.selection is None:
            return self
        B, n, P, V = self.mixed.shape
        L = self.base.shape[1]
        pos, valid = self.selection.positions, self.selection.valid[:, None]  # (B, P), (B, 1, P)

        def spread(t, fill):  # (B, n, P, ...) at the thinking positions -> (B, n, L, ...), `fill` elsewhere
            idx = pos.view(B, 1, P, *(1,) * (t.dim() - 3)).expand(t.shape)
            ok = valid.view(B, 1, P, *(1,) * (t.dim() - 3))
            return fill.scatter(2, idx, torch.where(ok, t, fill.gather(2, idx)))

        th = self.thoughts
        return NextTokenLogits(self.base, spread(self.mixed, self.base[:, None].expand(B, n, L, V).contiguous()),
                               spread(self.mix_weight, self.mix_weight.new_zeros(B, n, L)),
                               spread(th, th.new_zeros(B, n, L, th.shape[-1])), self.selection)


class Inference:
    """QuietStar's inference (a base class of QuietStar: `self` is the module)."""

    @contextlib.contextmanager
    def overridden(self, **changes):
        """Temporarily run with some ThoughtConfig fields changed (e.g. n_ahead_talk=1 for evaluation)."""
        saved = self.cfg
        self.configure(dataclasses.replace(saved, **changes))
        try:
            yield self
        finally:
            self.configure(saved)

    @torch.no_grad()
    def next_token_logits(self, input_ids, attention_mask=None, generator=None, n_thoughts: int = 1,
                          thoughts: Optional[torch.Tensor] = None,
                          selection: Optional[Selection] = None) -> "NextTokenLogits":
        """The prediction of x_{i+1} at every position, with and without a thought (the paper's
        evaluation: K = 1, the mixed logits at the <end> step). -> NextTokenLogits with base (B, L, V),
        mixed (B, n, P, V), mix_weight (B, n, P), thoughts (B, n, P, T-3) and, with thought.where, the
        selection of the P thinking positions (chosen here unless given; P = L when every position thinks)."""
        h = self.next_token_states(input_ids, attention_mask, generator, n_thoughts, thoughts, selection)
        return h._replace(base=self.model.head(h.base), mixed=self.model.head(h.mixed))

    @torch.no_grad()
    def next_token_hidden(self, input_ids, attention_mask=None, generator=None, n_thoughts: int = 1,
                          thoughts: Optional[torch.Tensor] = None, doc_ids=None):
        """`next_token_logits` before the LM head, at every position: -> (base hidden (B, L, d), mixed hidden
        (B, n, L, d) (the base one where thought.where chose no thought), mix weight (B, n, L), thoughts
        (B, n, L, T-3)); distillation (distill.py) scores these in chunks."""
        h = self.next_token_states(input_ids, attention_mask, generator, n_thoughts, thoughts, doc_ids=doc_ids).full()
        return h.base, h.mixed, h.mix_weight, h.thoughts

    @torch.no_grad()
    def next_token_states(self, input_ids, attention_mask=None, generator=None, n_thoughts: int = 1,
                          thoughts: Optional[torch.Tensor] = None, selection: Optional[Selection] = None,
                          doc_ids=None) -> "NextTokenLogits":
        """`next_token_logits` with final hidden states (..., d) in place of the logits."""
        with self.overridden(n_ahead_talk=1, n_thoughts=n_thoughts):
            lengths = self._check_input(input_ids, attention_mask)
            if thoughts is None:
                thoughts, _, selection = self.rollout_at(input_ids, lengths, generator, doc_ids, selection)
            positions = None if selection is None else selection.positions
            if positions is None:
                h = self.learning_pass.hidden(self, input_ids, thoughts, lengths, doc_ids)
                h = GridStates(h[:, 0], h[:, 1:], None)
            else:
                h = self.learning_pass.hidden(self, input_ids, thoughts, lengths, doc_ids, positions)
            grid = self.grid(n_thoughts)
            h0 = h.text
            h_end = grid.at_step(h, grid.talk_step(0)) if self.close_id is None else \
                grid.at_steps(h, self.read_steps(thoughts, grid)[0])
            h_mix, w = self.mix(at_positions(h0, positions)[:, None].expand_as(h_end), h_end)
            return NextTokenLogits(h0, h_mix, w, thoughts, selection)

    @torch.no_grad()
    def think(self, feed, h_base: torch.Tensor, position: torch.Tensor, generator=None,
              temperature: Optional[float] = None, thoughts: Optional[torch.Tensor] = None):
        """Think at the last position of a cached text, for P rows at once (generation and evaluation).

        feed(tokens (P,), position_ids (P,)) -> hidden (P, d) runs one single-token step on a K/V cache that
        holds the text up to each row's thinking position `position` (P,); h_base (P, d) is the text's hidden
        state there. Feeds <start>, t_1..t_{T-3} (sampled at `temperature`, default the training one, or
        taken from `thoughts` (P, T-3)) and <end> at grid steps 1..T-1 (positions position + s), then mixes
        the <end> step's output (with thought.close_token, the output of the step fed a thought's first close).
        -> (mixed logits (P, V), mix weight (P,), the thought (P, T-3)). The caller drops the thought's K/V."""
        grid = ThoughtGrid(self.cfg.n_ahead, 1)
        temperature = self.cfg.gumbel_temperature if temperature is None else temperature
        token = torch.full_like(position, self.start_token_id)
        sampled = []
        read, closed = None, torch.zeros_like(position, dtype=torch.bool)
        for s in range(grid.START_STEP, grid.end_step + 1):
            h = feed(token, grid.position_ids(s, position))
            if self.close_id is not None:  # thought.close_token: a thought is read where it first closes
                now = (token == self.close_id) & ~closed
                read = h if read is None else torch.where(now[:, None], h, read)
                closed = closed | now
            if s <= grid.n_sampled:  # step s predicts t_s
                token = thoughts[:, s - 1].to(position.device) if thoughts is not None else \
                    sample_categorical(self.model.head(h).float(), temperature, generator)
                sampled.append(token)
            else:
                token = torch.full_like(position, self.end_token_id)
        if read is not None:
            h = torch.where(closed[:, None], read, h)
        h_mix, w = self.mix(h_base, h)  # h: the <end> step's output (or the close's)
        th = torch.stack(sampled, -1) if sampled else position.new_zeros(position.shape[0], 0)
        return self.model.head(h_mix), w, th

    def decode_thought(self, thoughts: torch.Tensor, b: int, copy: int, position: int) -> str:
        """The thought sampled after position `position` of sequence b, copy `copy`, as text (up to its close, with
        thought.close_token: the tokens after it are not part of it)."""
        if self.tokenizer is None:
            raise ValueError("decode_thought needs a tokenizer")
        ids = thoughts[b, copy, position].tolist()
        if self.close_id is not None and self.close_id in ids:
            ids = ids[:ids.index(self.close_id) + 1]
        return self.tokenizer.decode(ids)
