"""Log-probabilities of categorical features under the decoder.

The decoder's last layer holds one flat run of logits for all categorical features, one group
per feature; log p(code) is the code's logit minus its group's logsumexp. How that run is
normalised is chosen once per model from the vocabulary sizes:

- **one block** (a few short vocabularies, at most BLOCK_LOGITS logits in all): the run comes
  out of the last layer with every other output and is normalised in one pass, an exp shifted by
  the row's maximum and a matmul with a 0/1 group indicator (every group's sum of exp at once).
  If some group's sum underflows there (logits > ~70 nats apart), each group is shifted by its
  own maximum instead (one scatter_reduce), which is exact;
- **several blocks** (large vocabularies): the last layer's categorical rows are evaluated a
  block of groups at a time and each block is normalised while its logits are still in cache; a
  block of one group is a plain logsumexp. Only one block of logits exists at a time, so a
  (sample, record) pair's working memory is the widest block, not the whole vocabulary
  (`materialised`, which the estimators' memory budget counts). On 20 strings of 1,001 values
  this made the categorical part ~3x faster per pair (bench/RESULTS.md, wide tables).

Both give the same function of the weights; tests check each against a per-group log_softmax.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vaewatch.model import fused

BLOCK_LOGITS = 1024  # logits normalised together; above this in all, the head is blocked


def pack_blocks(sizes: list[int], limit: int = BLOCK_LOGITS) -> list[tuple[int, int]]:
    """Consecutive groups packed greedily into blocks of at most `limit` logits (a group larger
    than that is a block of its own): [(first group, end group), ...]."""
    blocks, start, width = [], 0, 0
    for g, size in enumerate(sizes):
        if g > start and width + size > limit:
            blocks.append((start, g))
            start, width = g, 0
        width += size
    if sizes:
        blocks.append((start, len(sizes)))
    return blocks


class Categories(nn.Module):
    """The categorical groups of a decoder whose categorical logits are rows
    [first, first + sum(sizes)) of its last layer; `offsets` (n_cat,) where each group starts
    in that run (VAEConfig.category_offsets)."""

    def __init__(
        self, sizes: list[int], offsets: torch.Tensor, first: int, block_logits: int = BLOCK_LOGITS
    ):
        super().__init__()
        self.sizes, self.first = list(sizes), first
        total = sum(self.sizes)
        self.bounds = [*offsets.tolist(), total]  # logit position where each group starts, end
        self.blocks = pack_blocks(self.sizes, block_logits) if total > block_logits else []
        group_index = torch.repeat_interleave(
            torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long)
        )  # (sum(sizes),): the group each logit belongs to
        groups = (group_index[:, None] == torch.arange(len(sizes))).float()  # (sum, n_cat) 0/1
        self.register_buffer("groups", groups, persistent=False)
        self.register_buffer("group_index", group_index, persistent=False)
        self.register_buffer("offsets", offsets.clone(), persistent=False)

    @property
    def blocked(self) -> bool:
        """True when the logits are evaluated block by block (`from_hidden`), not in one piece."""
        return bool(self.blocks)

    @property
    def materialised(self) -> int:
        """Categorical logits held at once per (sample, record) pair."""
        if not self.blocked:
            return self.bounds[-1]
        return max(self.bounds[g1] - self.bounds[g0] for g0, g1 in self.blocks)

    def log_prob(self, logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """logits (..., B, sum(sizes)), codes (B, n_cat) long -> log p(code) (..., B, n_cat)."""
        return self._normalise(logits, codes, 0, len(self.sizes))

    def from_hidden(
        self, hidden: torch.Tensor, layer: nn.Linear, codes: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """The last layer's categorical rows applied to `hidden` (..., B, H) a block at a time,
        each normalised in `dtype`: log p(code) (..., B, n_cat)."""
        parts = []
        for g0, g1 in self.blocks:
            rows = slice(self.first + self.bounds[g0], self.first + self.bounds[g1])
            logits = fused.linear(hidden, layer.weight[rows], layer.bias[rows])
            if g1 - g0 == 1:
                # one group: log_softmax, converting to `dtype` inside its fused kernel (3.6x
                # faster than converting first, then logsumexp, on 1,001 bf16 logits)
                lp = torch.log_softmax(logits, -1, dtype=dtype)
                parts.append(lp.gather(-1, codes[:, g0:g1].expand(*lp.shape[:-1], 1)))
            else:
                parts.append(self._normalise(logits.to(dtype), codes[:, g0:g1], g0, g1))
        return torch.cat(parts, dim=-1)

    def _normalise(self, logits: torch.Tensor, codes: torch.Tensor, g0: int, g1: int):
        """log p(code) for groups [g0, g1), whose logits are the last axis of `logits`."""
        lo, hi = self.bounds[g0], self.bounds[g1]
        offsets = self.offsets[g0:g1] - lo
        groups = self.groups[lo:hi, g0:g1].to(logits.dtype)
        shape = (*logits.shape[:-1], g1 - g0)
        selected = logits.gather(-1, (codes + offsets).expand(shape))
        detached = logits.detach()
        shift = detached.amax(-1, keepdim=True)
        sums = torch.exp(logits - shift) @ groups  # (..., B, groups)
        if bool((sums > 1e-30).all()):
            return selected - (torch.log(sums) + shift)
        # some group lies > ~70 nats below the row's largest logit: shift each group by its own
        # maximum (a scatter over the flat vector); its largest term is then exp(0) = 1
        group_of = (self.group_index[lo:hi] - g0).expand(detached.shape)
        group_max = torch.full(
            shape, -math.inf, dtype=detached.dtype, device=detached.device
        ).scatter_reduce(-1, group_of, detached, "amax")  # (..., B, groups)
        sums = torch.exp(logits - group_max.gather(-1, group_of)) @ groups
        return selected - (torch.log(sums) + group_max)
