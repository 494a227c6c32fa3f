"""The rollout batch: one online step's samples on the training device, built once after
generation and scoring, in the layout the training forward produces (torchtune's Trajectory).

Layout. B samples (GRPO: G per prompt, in group order), sample i a prompt and L_i completion
tokens. Every per-token quantity is a (B, T) float32 row tensor, T = max L_i, sample i's
completion tokens at [i, :L_i] and zeros beyond (mask (B, T) bool says which). A packed forward
over some samples (data.pack: prompt + completion, no padding) gives (1, total) per-position
values; MicroBatch.rows picks its sequences' completion positions into (b, T_mb) rows of the
same layout, so a micro-batch's view of any batch tensor is x[mb.index, :mb.T] (an index on the
device, no copy to the host and back). `tokens` holds the flat indices of the valid positions
in row-major order: x.flatten()[tokens] is x[mask] without the device sync boolean indexing
costs on an accelerator.

Nothing here reads a value back to the host: every index is computed on the host from the
token ids it already holds, then moved to the device once. Statistics stay tensors until the
one read-back per optimiser step (update.py, logs.DeviceMetrics).

Shapes: B samples, T longest completion, b samples of a micro-batch, T_mb its longest.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch

from fastrlhf import data, dist, models
from fastrlhf.rollout import Sample


def sequences(samples: list[Sample]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) for data.pack: loss positions are the completion tokens."""
    return [(s.prompt_ids + s.completion_ids, [data.IGNORE] * len(s.prompt_ids) + s.completion_ids)
            for s in samples]


@dataclass
class MicroBatch:
    """A packed forward over some samples of the batch: its model inputs on the device, which
    samples it holds (index on the device, seq on the host, in packing order) and where their
    completion tokens sit in the packed row."""

    inputs: dict  # data.pack's micro-batch, tensors on the device
    seq: list[int]  # the batch rows it holds (host)
    index: torch.Tensor  # (b,) the same rows (device)
    T: int  # its longest completion
    n_tokens: int  # its completion tokens
    n_nonempty: int  # its samples with at least one completion token
    _pos: torch.Tensor  # (n_tokens,) position of each completion token in the packed row
    _row: torch.Tensor  # (n_tokens,) its row within the micro-batch
    _col: torch.Tensor  # (n_tokens,) its index within that row's completion
    weight: float = 1.0  # 0: a repeat that evens out the ranks' forwards (torchrun), worth nothing

    def rows(self, token_vals: torch.Tensor) -> torch.Tensor:
        """(1, total) per-position values -> (b, T_mb): each sequence's completion positions in
        order, 0 beyond its completion."""
        out = token_vals.new_zeros(len(self.seq), self.T)
        out[self._row, self._col] = token_vals[0, self._pos]
        return out  # (b, T_mb)

    def view(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """This micro-batch's rows of a (B, T) batch tensor: (b, T_mb)."""
        return None if x is None else x[self.index, : self.T]

    def loss_fraction(self, loss_agg: str, total_tokens: int, total_rows: int) -> float:
        """Weight of this micro-batch's aggregated loss so that the sum over the micro-batches of a
        minibatch equals the loss aggregated over the whole minibatch (policy_loss aggregates
        within one call): its fraction of the tokens, of the non-empty rows or of the rows. (Not
        dist.share, which is a rank's slice of a batch.)"""
        if loss_agg == "token-mean":
            return self.n_tokens / max(1, total_tokens)
        if loss_agg == "seq-mean-token-mean":
            return self.n_nonempty / max(1, total_rows)
        return len(self.seq) / max(1, total_rows)


def micro_batches(samples: list[Sample], idx: list[int], budget: int, device) -> list[MicroBatch]:
    """The samples idx packed into micro-batches of at most `budget` tokens, in that order.
    Sharded (torchrun): followed by zero-weight repeats up to the largest count on any rank,
    so that every rank runs as many forwards and backwards (FSDP's collectives)."""
    out = _pack(samples, idx, budget, device)
    if dist.world_size() > 1:
        n = dist.max_over_ranks(len(out))
        if len(out) < n:
            filler = out[0] if out else _pack(samples, [0], budget, device)[0]
            out += [dataclasses.replace(filler, weight=0.0)] * (n - len(out))
    return out


def _pack(samples: list[Sample], idx: list[int], budget: int, device) -> list[MicroBatch]:
    out = []
    for mb in data.pack(sequences([samples[i] for i in idx]), budget):
        seq = [idx[j] for j in mb["seq_index"]]
        lengths = [len(samples[i].completion_ids) for i in seq]
        # label positions of a sequence = its completion tokens (pack shifts the labels by one)
        pos = (mb["labels"][0] != data.IGNORE).nonzero().squeeze(1)  # (n_tokens,) host
        row = torch.repeat_interleave(torch.arange(len(seq)), torch.tensor(lengths, dtype=torch.long))
        if len(pos) != sum(lengths):
            raise ValueError(f"a sample without a prompt token: {sum(lengths)} completion tokens, {len(pos)} targets")
        starts = torch.tensor(list(itertools.accumulate([0] + lengths[:-1])), dtype=torch.long)
        col = torch.arange(len(pos)) - starts[row]
        out.append(MicroBatch(
            inputs=data.to_device(mb, device), seq=seq, index=torch.tensor(seq, device=device),
            T=max(lengths, default=0), n_tokens=sum(lengths), n_nonempty=sum(n > 0 for n in lengths),
            _pos=pos.to(device), _row=row.to(device), _col=col.to(device)))
    return out


@dataclass
class RolloutBatch:
    """One step's samples and every per-token quantity of them, on the training device.

    Filled in order by the trainers: build() (sampler log-probs, scores, mask), then the packed
    passes below (old / reference log-probs, values, token rewards), then the advantages (and
    PPO's returns), then the update reads minibatch views of it."""

    samples: list[Sample]  # host: token ids (packing), texts (samples.jsonl)
    lengths: list[int]  # host: each sample's completion tokens, L_i
    train: list[int]  # the rows the update trains on
    mask: torch.Tensor  # (B, T) bool: completion positions
    tokens: torch.Tensor  # (n,) long: flat indices of mask's True positions, row-major
    last: torch.Tensor  # (B,) long: each row's last completion position (L_i - 1)
    sampler: torch.Tensor  # (B, T) the engine's log-probs of the sampled tokens
    scores: torch.Tensor  # (B,) each sample's reward (failed ones imputed)
    old: torch.Tensor | None = None  # (B, T) the trainer's log-probs before the update (None: on-policy)
    ref: torch.Tensor | None = None  # (B, T) the frozen reference's
    values: torch.Tensor | None = None  # (B, T) the critic's V(s_t) (PPO)
    token_rewards: torch.Tensor | None = None  # (B, T) a process reward's per-token rewards (PPO)
    advantages: torch.Tensor | None = None  # (B, T), 0 beyond each completion
    returns: torch.Tensor | None = None  # (B, T) the critic's targets (PPO)

    @classmethod
    def build(cls, samples: list[Sample], device, train: list[int] | None = None) -> RolloutBatch:
        lengths = [len(s.completion_ids) for s in samples]
        T = max(lengths, default=0)
        mask = torch.arange(T)[None] < torch.tensor(lengths, dtype=torch.long)[:, None]  # (B, T) host
        sampler = torch.tensor([list(s.logprobs) + [0.0] * (T - len(s.logprobs)) for s in samples],
                               dtype=torch.float32).reshape(len(samples), T)
        return cls(samples=samples, lengths=lengths, train=list(range(len(samples))) if train is None else train,
                   mask=mask.to(device), tokens=mask.flatten().nonzero().squeeze(1).to(device),
                   last=(torch.tensor(lengths, dtype=torch.long) - 1).to(device), sampler=sampler.to(device),
                   scores=torch.tensor([s.reward for s in samples], dtype=torch.float32).to(device))

    @property
    def device(self) -> torch.device:
        return self.mask.device

    def valid(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T) at the completion positions, flattened row-major: x[mask], sync-free. (n,)"""
        return x.flatten()[self.tokens]

    def whitening(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased std of x (B, T) over the completion tokens (0-d tensors, on the
        device); sharded, over every rank's (one collective, on the device)."""
        valid = self.valid(x)
        if dist.world_size() == 1:
            return valid.mean(), valid.std()
        mean, var = self._moments(valid)
        return mean, var.sqrt()

    def variance(self, x: torch.Tensor) -> torch.Tensor:
        """Unbiased variance of x (B, T) over the completion tokens (every rank's, sharded)."""
        valid = self.valid(x)
        return valid.var() if dist.world_size() == 1 else self._moments(valid)[1]

    def _moments(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, s1, s2 = dist.all_reduce_sum(torch.stack([torch.tensor(float(valid.numel()), device=valid.device),
                                                      valid.sum(), (valid * valid).sum()]))
        mean = s1 / n
        return mean, (s2 - n * mean * mean).clamp(min=0) / (n - 1)

    def sample_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of a per-sample x (B,) over every rank's samples (0-d, on the device)."""
        if dist.world_size() == 1:
            return x.mean()
        n = dist.all_reduce_sum(torch.tensor(float(x.numel()), device=x.device))
        return dist.all_reduce_sum(x.sum()) / n

    def micro_batches(self, idx: list[int], budget: int) -> list[MicroBatch]:
        return micro_batches(self.samples, idx, budget, self.device)

    @torch.no_grad()
    def packed_pass(self, per_position, budget: int) -> torch.Tensor:
        """per_position(model inputs) -> (1, total) values, over every sample in packed
        micro-batches; returns them at the completion positions, (B, T) float32 on the device."""
        out = torch.zeros(self.mask.shape, device=self.device)
        for mb in self.micro_batches(list(range(len(self.samples))), budget):
            vals = mb.rows(per_position(mb.inputs)).float()
            if mb.weight:
                out[mb.index, : mb.T] = vals
        return out

    def logprobs(self, model, budget: int, temperature: float) -> torch.Tensor:
        """The model's log-probs of every completion token (old / reference), (B, T)."""
        model.eval()
        return self.packed_pass(lambda mb: models.token_logprobs(model, mb, temperature=temperature), budget)

    def critic_values(self, critic, budget: int) -> torch.Tensor:
        """The critic's value at each completion token's position (the state before the token), (B, T)."""
        critic.eval()
        return self.packed_pass(lambda mb: models.token_values(critic, mb), budget)

    def reward_tokens(self, rm, budget: int) -> torch.Tensor:
        """A logprob reward model's per-token rewards of each completion (models.token_rewards), (B, T)."""
        rm.eval()
        return self.packed_pass(lambda mb: models.token_rewards(rm, mb), budget)

    def sampler_gap(self, logprobs: torch.Tensor) -> torch.Tensor:
        """max |sampler - logprobs| over the completion tokens (0-d, on the device): how far the
        engine's log-probs are from the trainer's (rollout/logprob_diff_max)."""
        if not self.tokens.numel():
            return torch.zeros((), device=self.device)
        return self.valid((self.sampler - logprobs).abs()).max()
