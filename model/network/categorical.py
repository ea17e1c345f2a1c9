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
  this made the categorical part ~3x faster per pair (bench/notes/, wide tables).

Both give the same function of the weights; tests check each against a per-group log_softmax.

A large vocabulary (at least `two_level_min` classes, VAEConfig) is decoded as a **two-level
softmax** instead: its codes, in frequency order, are cut into consecutive clusters of
ceil(sqrt(V)) classes, and log p(code | z) = log p(cluster | z) + log p(code | cluster, z). It is a
normalised distribution over the V classes like the flat one (any distribution factorises this
way), but a (sample, record) pair evaluates ~2 sqrt(V) logits instead of V: the cluster logits,
then the class logits of the record's own cluster, whose weight rows are gathered once per
record and shared by its samples. Consecutive two-level groups of the same size are one block,
evaluated together (their class rows first, cluster after cluster, then their cluster rows), so
20 columns capped at 1,000 values cost one batched matmul per step, not 20. On 20 strings of
1,001 values scoring is ~3x faster in process than with the flat head (bench/notes/, wide
tables). A model saved before this existed keeps its flat heads (`two_level_min` 0, set by
model/artifact.py's format upgrade).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vaewatch.model.network import fused

BLOCK_LOGITS = 1024  # logits normalised together; above this in all, the head is blocked
TRAIN_GATHERED = 2**22  # class-row elements gathered at once with gradients (`_two_level`)


def two_level_shape(size: int) -> tuple[int, int]:
    """(clusters, width) of a two-level group of `size` classes: `width` = ceil(sqrt(size))
    consecutive codes per cluster, as many clusters as that takes (only the last partly full)."""
    width = math.isqrt(size - 1) + 1
    return -(-size // width), width


def is_two_level(size: int, two_level_min: int) -> bool:
    return two_level_min > 0 and size >= two_level_min


def pack_blocks(
    sizes: list[int], limit: int = BLOCK_LOGITS, runs: list[int | None] | None = None
) -> list[tuple[int, int]]:
    """Consecutive groups packed greedily into blocks of at most `limit` logits (a group larger
    than that is a block of its own): [(first group, end group), ...]. A group whose `runs`
    entry is not None (a two-level group's width) shares a block only with the consecutive
    groups of the same entry, however many logits they hold."""
    runs = runs or [None] * len(sizes)
    blocks, start, width = [], 0, 0
    for g, size in enumerate(sizes):
        if g > start:
            same_run = runs[g] is not None and runs[g] == runs[g - 1]
            flat = runs[g] is None and runs[g - 1] is None and width + size <= limit
            if not (same_run or flat):
                blocks.append((start, g))
                start, width = g, 0
        width += size
    if sizes:
        blocks.append((start, len(sizes)))
    return blocks


def layout(
    sizes: list[int], two_level_min: int, limit: int = BLOCK_LOGITS
) -> tuple[list[int], list[tuple[int, int]], list[tuple[int, int] | None]]:
    """How the categoricals sit in the decoder's last layer: (rows per group, blocks, each
    block's (clusters, width) where it is two-level, else None). Consecutive two-level groups
    of the same width form one block, every group in it padded to the block's largest number
    of clusters; a group there takes clusters * width class rows and clusters cluster rows."""
    two = [is_two_level(s, two_level_min) for s in sizes]
    widths = [two_level_shape(s)[1] if t else None for s, t in zip(sizes, two, strict=True)]
    blocks = pack_blocks(sizes, limit, widths)
    rows: list[int] = []
    shapes: list[tuple[int, int] | None] = []
    for g0, g1 in blocks:
        if not two[g0]:
            rows += sizes[g0:g1]
            shapes.append(None)
            continue
        clusters = max(two_level_shape(s)[0] for s in sizes[g0:g1])
        rows += [clusters * (widths[g0] + 1)] * (g1 - g0)
        shapes.append((clusters, widths[g0]))
    return rows, blocks, shapes


class Categories(nn.Module):
    """The categorical groups of a decoder whose categorical logits are rows
    [first, first + self.rows) of its last layer, group after group (`layout`); groups of at
    least `two_level_min` classes are two-level (0: none)."""

    def __init__(
        self,
        sizes: list[int],
        first: int,
        block_logits: int = BLOCK_LOGITS,
        two_level_min: int = 0,
    ):
        super().__init__()
        self.sizes, self.first = list(sizes), first
        self.two_level = [is_two_level(s, two_level_min) for s in self.sizes]
        rows, blocks, self.shapes = layout(self.sizes, two_level_min, block_logits)
        self.bounds = [0, *itertools.accumulate(rows)]  # row where each group starts, end
        self.rows = self.bounds[-1]
        blocked = self.rows > block_logits or any(self.two_level)
        self.blocks = blocks if blocked else []  # a test may empty it: `shapes` then unused
        offsets = torch.tensor(self.bounds[:-1], dtype=torch.long)
        group_index = torch.repeat_interleave(
            torch.arange(len(sizes)), torch.tensor(rows, dtype=torch.long)
        )  # (rows,): the group each logit belongs to
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
            return self.rows
        return max(
            (g1 - g0) * sum(shape) if shape else self.bounds[g1] - self.bounds[g0]
            for (g0, g1), shape in zip(self.blocks, self.shapes, strict=False)
        )

    @property
    def gathered_rows(self) -> int:
        """Weight rows gathered per record for the widest two-level block (each group's cluster
        of class rows; shared by the record's samples in a step), 0 without one."""
        return max(
            (
                (g1 - g0) * shape[1]
                for (g0, g1), shape in zip(self.blocks, self.shapes, strict=False)
                if shape
            ),
            default=0,
        )

    def log_prob(self, logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """logits (..., B, sum(sizes)), codes (B, n_cat) long -> log p(code) (..., B, n_cat)."""
        return self._normalise(logits, codes, 0, len(self.sizes))

    def from_hidden(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        codes: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The last layer's categorical rows (of `weight`, `bias`: the whole layer, in the
        hidden units' dtype) applied to `hidden` (..., B, H) a block at a time, each normalised
        in `dtype`: log p(code) (..., B, n_cat)."""
        per_record = None  # hidden as (B, samples, H), for the two-level groups
        parts = []
        for (g0, g1), shape in zip(self.blocks, self.shapes, strict=True):
            rows = slice(self.first + self.bounds[g0], self.first + self.bounds[g1])
            if shape:
                if per_record is None:
                    per_record = hidden.reshape(-1, *hidden.shape[-2:]).transpose(0, 1).contiguous()
                lp = self._two_level(
                    per_record, weight[rows], bias[rows], codes, g0, g1, shape, dtype
                )
                parts.append(lp.transpose(0, 1).reshape(*hidden.shape[:-1], g1 - g0))
                continue
            logits = fused.linear(hidden, weight[rows], bias[rows])
            if g1 - g0 == 1:
                # one group: log_softmax, converting to `dtype` inside its fused kernel (3.6x
                # faster than converting first, then logsumexp, on 1,001 bf16 logits)
                lp = torch.log_softmax(logits, -1, dtype=dtype)
                parts.append(lp.gather(-1, codes[:, g0:g1].expand(*lp.shape[:-1], 1)))
            else:
                parts.append(self._normalise(logits.to(dtype), codes[:, g0:g1], g0, g1))
        return torch.cat(parts, dim=-1)

    def distribution(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, g: int):
        """log p(c | z) of every class c of group `g`, (..., sizes[g]) float32: the last layer's
        rows of that group (of `weight`, `bias`: the whole layer) applied to `hidden` (..., H),
        flat or two-level as the group is decoded. The same function `log_prob` evaluates at
        one code; what the explanations read to name a feature's likely classes."""
        start, size = self.first + self.bounds[g], self.sizes[g]
        if not self.two_level[g]:
            rows = slice(start, start + size)
            return torch.log_softmax(
                nn.functional.linear(hidden.float(), weight[rows].float(), bias[rows].float()), -1
            )
        b = next(i for i, (g0, g1) in enumerate(self.blocks) if g0 <= g < g1)
        (g0, g1), (clusters, width) = self.blocks[b], self.shapes[b]
        block = self.first + self.bounds[g0]
        span = clusters * width
        classes = slice(block + (g - g0) * span, block + (g - g0 + 1) * span)
        tops = block + (g1 - g0) * span + (g - g0) * clusters
        tops = slice(tops, tops + clusters)
        h = hidden.float()
        code = torch.arange(clusters * width, device=h.device)
        low = nn.functional.linear(h, weight[classes].float(), bias[classes].float())
        low = low.masked_fill(code >= size, -math.inf).view(*h.shape[:-1], clusters, width)
        low = torch.log_softmax(low, -1).nan_to_num(nan=-math.inf)  # an unused cluster: all -inf
        top = nn.functional.linear(h, weight[tops].float(), bias[tops].float())
        top = top.masked_fill(code[::width] >= size, -math.inf)
        top = torch.log_softmax(top, -1)
        return (top[..., None] + low).flatten(-2)[..., :size]

    def _two_level(self, per_record, weight, bias, codes, g0, g1, shape, dtype) -> torch.Tensor:
        """A two-level block [g0, g1) (`two_level_log_prob`), (B, L, g1 - g0). With gradients
        (training) it runs a few groups at a time under activation checkpointing: the class rows
        gathered per record are then neither kept for the backward pass nor held for every
        group at once (recomputed there instead), so training's memory does not grow with the
        number of large columns: on 40 strings of 1,000 values the gathered rows were ~170 MB
        per 256-row batch, kept twice."""
        clusters, width = shape
        split = (g1 - g0) * clusters * width
        if not torch.is_grad_enabled():
            steps = [(g0, g1)]
        else:
            per_call = max(1, TRAIN_GATHERED // (per_record.shape[0] * width * per_record.shape[2]))
            steps = [(a, min(a + per_call, g1)) for a in range(g0, g1, per_call)]
        parts = []
        for a, b in steps:
            classes = slice((a - g0) * clusters * width, (b - g0) * clusters * width)
            tops = slice(split + (a - g0) * clusters, split + (b - g0) * clusters)
            args = (per_record, weight[classes], bias[classes], weight[tops], bias[tops])
            rest = (codes[:, a:b], self.sizes[a:b], shape, dtype)
            if torch.is_grad_enabled():
                parts.append(checkpoint(two_level_log_prob, *args, *rest, use_reentrant=False))
            else:
                parts.append(two_level_log_prob(*args, *rest))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

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


def two_level_log_prob(
    per_record: torch.Tensor,
    class_weight: torch.Tensor,
    class_bias: torch.Tensor,
    cluster_weight: torch.Tensor,
    cluster_bias: torch.Tensor,
    codes: torch.Tensor,
    sizes: list[int],
    shape: tuple[int, int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """log p(code | z) of m two-level groups of `sizes` classes, laid out with `shape` =
    (clusters, width) (`layout`): `class_weight` (m * clusters * width, H) holds every group's
    class rows (cluster after cluster, `width` each), `cluster_weight` (m * clusters, H) every
    group's cluster rows, with their biases. per_record (B, L, H): the hidden units of each
    record's L samples; codes (B, m) -> (B, L, m), each softmax normalised in `dtype`."""
    clusters, width = shape
    n, samples, h = per_record.shape
    m = codes.shape[1]
    cluster, position = codes // width, codes % width  # (B, m)
    class_bias = class_bias.view(m * clusters, width)
    if clusters * width > min(sizes):  # rows past a group's last code are no class: -inf bias
        limit = torch.tensor(sizes, device=class_bias.device)[:, None, None]  # (m, 1, 1)
        code = torch.arange(clusters * width, device=class_bias.device).view(1, clusters, width)
        class_bias = class_bias.masked_fill((code >= limit).view(m * clusters, width), -math.inf)
        empty = code[:, :, 0] >= limit[:, :, 0]  # (m, clusters): clusters a group does not use
        cluster_bias = cluster_bias.masked_fill(empty.view(-1), -math.inf)
    # every group's cluster logits in one matmul
    top = fused.linear(per_record, cluster_weight, cluster_bias)  # (B, L, m * clusters)
    top = torch.log_softmax(top.view(n, samples, m, clusters), -1, dtype=dtype)
    top = top.gather(-1, cluster[:, None, :, None].expand(n, samples, m, 1))
    # the class rows of each record's own clusters, gathered once and shared by its samples
    chosen = (cluster + clusters * torch.arange(m, device=codes.device)).view(-1)  # (B * m,)
    rows = class_weight.view(m * clusters, width, h).index_select(0, chosen)
    shift = class_bias.index_select(0, chosen).view(n, 1, m * width)
    logits = torch.baddbmm(shift, per_record, rows.view(n, m * width, h).transpose(1, 2))
    low = torch.log_softmax(logits.view(n, samples, m, width), -1, dtype=dtype)
    low = low.gather(-1, position[:, None, :, None].expand(n, samples, m, 1))
    return (top + low)[..., 0]
