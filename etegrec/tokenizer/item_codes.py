"""Item codes: the table of every item's ID (``ItemCodes``), its prefix trie, the suffix that makes IDs unique,
and codebook health statistics.

An item's ID is a tuple of C tokens: one code per tokenizer level, then a suffix. Suffix rule (as TIGER): items
are visited in item-id order; an item's suffix is the number of earlier items with the same code tuple, so the
first item of a collision group gets 0, the next 1, ... Example with 3 items: codes ``[[1, 2], [1, 2], [0, 5]]``
-> ``[[1, 2, 0], [1, 2, 1], [0, 5, 0]]``.

Collision measures (both reported, named so they cannot be confused):
* ``collision_rate = (N - #distinct tuples) / N``: the share of items that need a non-zero suffix (the reference
  code's and the README's "collision rate"; 0 = all tuples distinct).
* ``collided_share = #items whose tuple is shared with another item / N`` (always >= collision_rate).

Per-level usage is the share of the K codes used at least once, perplexity is ``exp(entropy)`` of the code
frequencies (K = perfectly uniform), and the Gini coefficient is the reference's
``G = sum_i (2i - K - 1) c_(i) / (K sum c)`` over the K counts sorted ascending (0 = uniform). The reported
``gini`` is the mean over levels.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from etegrec.artifacts import ArtifactError


class ItemCodes:
    """The item-code table of a catalogue of N items: every item's C-token ID, indexed by item id.

    ``table`` (N+1, C) long: row i holds item i's tokens, each in [0, code_num); row 0 (the padding item) is all
    -1, so indexing it with padded item-id histories gives -1 padding codes. Every ID is distinct (IDs carry the
    collision suffix, ``add_suffix``). These invariants are checked when a table is built and on every
    ``update``. The tensor lives in shared memory and is updated in place, so DataLoader workers see new codes at
    their next batch. ``trie(device)`` is built on first use and rebuilt only after the codes change.

    Args:
        codes: (N, C) codes of items 1..N in id order (the form checkpoint files hold, see ``stored``).
        code_num: K, tokens per level.
        n_items: the catalogue size the table must cover (e.g. the item map's), if known.
        code_length: the C the model expects, if known.
    """

    def __init__(self, codes: Tensor, code_num: int, *, n_items: int | None = None, code_length: int | None = None):
        codes = _checked(codes, code_num, n_items, code_length)  # (N, C)
        self.code_num = code_num
        self.table = torch.cat([codes.new_full((1, codes.shape[1]), -1), codes]).share_memory_()  # (N+1, C)
        self._tries: dict[str, ItemTrie] = {}
        self._tables: dict[str, Tensor] = {}  # copies of ``table`` on other devices

    @classmethod
    def from_file(
        cls, codes: Any, code_num: int, source: str | Any, *, n_items: int | None = None, code_length: int | None = None
    ) -> ItemCodes:
        """The table a checkpoint file holds; ArtifactError naming ``source`` when it breaks an invariant."""
        try:
            return cls(codes, code_num, n_items=n_items, code_length=code_length)
        except ValueError as err:
            raise ArtifactError(f"{source}: {err}") from None

    @property
    def n_items(self) -> int:
        return self.table.shape[0] - 1

    @property
    def code_length(self) -> int:
        return self.table.shape[1]

    def stored(self) -> Tensor:
        """A (N, C) copy of the codes of items 1..N in id order: the form checkpoint files hold."""
        return self.table[1:].clone()

    def trie(self, device: torch.device | str = "cpu") -> ItemTrie:
        """The prefix trie of the current codes on ``device`` (built once per version of the codes)."""
        key = str(torch.device(device))
        if key not in self._tries:
            self._tries[key] = ItemTrie(self).to(device)
        return self._tries[key]

    def history_table(self, suffix: bool, device: torch.device | str = "cpu") -> Tensor:
        """The codes the encoder reads per history item: (N+1, C) with the suffix, else a (N+1, L) view without
        it (``history_width``); on ``device`` as ``table_on``, and like ``table`` updated in place."""
        return self.table_on(device)[:, : history_width(self.code_length, suffix)]

    def table_on(self, device: torch.device | str) -> Tensor:
        """``table`` on ``device``: itself on the CPU, elsewhere a copy made once per version of the codes."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.table
        key = str(device)
        if key not in self._tables:
            self._tables[key] = self.table.to(device)
        return self._tables[key]

    def churn(self, codes: Tensor) -> dict[str, float]:
        """How much a new table (N, C) of items 1..N changes the IDs.

        Returns:
            ``churn`` (share of items with any new token), ``prefix_churn`` (a new token before the suffix) and
            ``churn_first_level{l}`` (share of items whose first new token is at level l, l from 1; these sum to
            ``prefix_churn``).
        """
        changed = codes.to(self.table.device) != self.table[1:]  # (N, C) per item and token
        moved = changed[:, :-1].any(dim=1)  # (N,)
        first_level = changed[:, :-1].long().argmax(dim=1)[moved]  # (M,) index of the first True
        first_change = torch.bincount(first_level, minlength=changed.shape[1] - 1) / len(changed)  # (C-1,)
        return {
            "churn": float(changed.any(dim=1).double().mean()),
            "prefix_churn": float(moved.double().mean()),
            **{f"churn_first_level{level + 1}": share for level, share in enumerate(first_change.tolist())},
        }

    def update(self, codes: Tensor) -> None:
        """Replace every item's codes (a (N, C) table of items 1..N, checked as at construction)."""
        codes = _checked(codes, self.code_num, self.n_items, self.code_length)
        if not torch.equal(codes, self.table[1:]):
            self.table[1:].copy_(codes)
            self._tries.clear()
            self._tables.clear()


def history_width(code_length: int, suffix: bool) -> int:
    """Tokens per history item: all C tokens of an ID, or its L = C-1 level codes without the suffix."""
    return code_length if suffix else code_length - 1


def _checked(codes: Any, code_num: int, n_items: int | None, code_length: int | None) -> Tensor:
    """The invariants of ``ItemCodes``: a non-empty (N, C) tensor, the expected N and C, tokens in [0, code_num),
    distinct rows. Returns the codes as a CPU long tensor; raises ValueError naming the broken invariant."""
    if not isinstance(codes, Tensor) or codes.dim() != 2 or 0 in codes.shape:
        shape = tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
        raise ValueError(f"the item-code table must be a non-empty (N, C) tensor, got {shape}")
    if n_items is not None and codes.shape[0] != n_items:
        raise ValueError(
            f"the item-code table has shape {tuple(codes.shape)}: codes for {codes.shape[0]} items, but the data has "
            f"{n_items} items; it was made for another dataset or data preparation"
        )
    if code_length is not None and codes.shape[1] != code_length:
        raise ValueError(
            f"item IDs have {codes.shape[1]} tokens but code_length={code_length}; set code_length={codes.shape[1]} "
            f"(tokenizer levels + 1 suffix) or use a tokenizer with {code_length - 1} levels"
        )
    codes = codes.detach().long().cpu()
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= code_num:
        raise ValueError(
            f"item codes span [{low}, {high}] but code_num={code_num}; set code_num to the tokenizer's codebook "
            "size (its num_emb_list entries)"
        )
    inverse, counts = _groups(codes)
    if int(counts.max()) > 1:
        shared = codes[inverse == int(counts.argmax())]
        raise ValueError(
            f"{shared.shape[0]} items share the code tuple {shared[0].tolist()}; item IDs must be unique. Append "
            "the collision suffix (etegrec.tokenizer.item_codes.add_suffix)"
        )
    return codes


class ItemTrie:
    """Prefix trie of an item-code table as dense per-level child tables.

    ``children[l]`` is an int32 table (P_l, K): row p is the prefix with id p at level l (P_0 = 1, the empty
    prefix); entry k is the id of the prefix extended by token k at level l+1, or, at the last level, the item id
    (1..N); -1 = not a valid continuation. Prefix ids are assigned in sorted order of (parent id, token), so
    the trie is deterministic. Memory: sum_l P_l * K * 4 bytes (about 51 MB for N = 25k, K = 256, C = 4).
    Build it with ``ItemCodes.trie``.
    """

    def __init__(self, codes: ItemCodes) -> None:
        items = codes.table[1:]  # (N, C), checked: distinct rows, tokens in [0, K)
        n, c = items.shape
        k = codes.code_num
        children: list[Tensor] = []
        state = torch.zeros(n, dtype=torch.long)  # (N,) prefix id at the current level
        n_prefixes = 1
        for level in range(c):
            key = state * k + items[:, level]  # (N,) flat (parent, token) index
            table = torch.full((n_prefixes * k,), -1, dtype=torch.int32)
            if level < c - 1:
                uniq, state = torch.unique(key, return_inverse=True)  # sorted -> deterministic prefix ids
                table[uniq] = torch.arange(uniq.numel(), dtype=torch.int32)
                next_prefixes = uniq.numel()
            else:
                table[key] = torch.arange(1, n + 1, dtype=torch.int32)  # item ids
                next_prefixes = 0
            children.append(table.view(n_prefixes, k))
            n_prefixes = next_prefixes
        self.children = children
        self.code_num, self.code_length, self.n_items = k, c, n

    @property
    def device(self) -> torch.device:
        return self.children[0].device

    def to(self, device: torch.device | str) -> ItemTrie:
        """A copy of the trie on ``device`` (tables are moved, not rebuilt)."""
        moved = copy.copy(self)
        moved.children = [t.to(device) for t in self.children]
        return moved

    def next_states(self, level: int, states: Tensor) -> Tensor:
        """Child table rows for prefix ids at ``level``: (...,) -> (..., K) int32 (-1 = invalid token).

        Negative (dead) states are read as the root row; callers keep their scores at -inf.
        """
        return self.children[level][states.clamp(min=0)]

    def prefix_states(self, codes: Tensor) -> Tensor:
        """Prefix id of ``codes[..., :l]`` for every level l: (..., C) -> (..., C) long, -1 once off the trie."""
        state = torch.zeros(codes.shape[:-1], dtype=torch.long, device=codes.device)
        states = []
        for level in range(self.code_length):
            states.append(state)
            if level < self.code_length - 1:
                state = self._advance(level, state, codes[..., level])
        return torch.stack(states, dim=-1)

    def allowed_tokens(self, codes: Tensor) -> Tensor:
        """Trie children of every prefix of the given items: (N, C) codes -> (N, C, K) bool."""
        states = self.prefix_states(codes)  # (N, C)
        return torch.stack([self.next_states(lvl, states[:, lvl]) >= 0 for lvl in range(codes.shape[1])], dim=1)

    def lookup(self, codes: Tensor) -> Tensor:
        """Item id of every code tuple: (..., C) -> (...) long, 0 where the tuple is not an item."""
        if codes.shape[-1] != self.code_length:
            raise ValueError(f"codes must end in C={self.code_length}, got shape {tuple(codes.shape)}")
        state = torch.zeros(codes.shape[:-1], dtype=torch.long, device=codes.device)
        for level in range(self.code_length):
            state = self._advance(level, state, codes[..., level])
        return state.clamp(min=0)

    def _advance(self, level: int, state: Tensor, token: Tensor) -> Tensor:
        ok = (state >= 0) & (token >= 0) & (token < self.code_num)
        nxt = self.children[level][state.clamp(min=0), token.clamp(0, self.code_num - 1)].long()
        return torch.where(ok, nxt, torch.full_like(nxt, -1))


def _groups(codes: Tensor) -> tuple[Tensor, Tensor]:
    """Group id of each row and size of each group: (N, L) -> ((N,), (G,))."""
    _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    return inverse, counts


def add_suffix(codes: Tensor, code_num: int) -> Tensor:
    """Append the within-group rank as a last token: (N, L) -> (N, L+1) long.

    Raises:
        ValueError: a collision group has more than ``code_num`` items, so the suffix would not fit a token.
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be (N, L), got shape {tuple(codes.shape)}")
    codes = codes.long().cpu()
    n = codes.shape[0]
    if n == 0:
        return torch.empty(0, codes.shape[1] + 1, dtype=torch.long)
    inverse, counts = _groups(codes)
    largest = int(counts.max())
    if largest > code_num:
        example = codes[inverse == int(counts.argmax())][0].tolist()
        raise ValueError(
            f"{largest} items share the code tuple {example}, but the suffix token has only code_num={code_num} "
            "values. Lower the collisions: train the tokenizer with Sinkhorn balancing (--sk_epsilons, e.g. "
            "0.0 0.0 0.003, or larger/more non-zero epsilons), train longer, or use larger codebooks "
            "(--num_emb_list and code_num)."
        )
    order = torch.argsort(inverse, stable=True)  # (N,) rows grouped, id order inside a group
    starts = torch.cumsum(counts, 0) - counts  # (G,) first position of each group in `order`
    rank_sorted = torch.arange(n) - starts[inverse[order]]  # (N,) rank in group, in `order` positions
    suffix = torch.empty(n, dtype=torch.long)
    suffix[order] = rank_sorted
    return torch.cat([codes, suffix.unsqueeze(1)], dim=1)  # (N, L+1)


def level_stats(level_codes: Tensor, code_num: int) -> dict[str, float]:
    """Usage, perplexity and Gini of one level's codes (N,)."""
    counts = torch.bincount(level_codes.long().cpu(), minlength=code_num).double()  # (K,)
    total = counts.sum()
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    sorted_counts = counts.sort().values  # ascending
    i = torch.arange(1, code_num + 1, dtype=torch.float64)
    gini = ((2 * i - code_num - 1) * sorted_counts).sum() / (code_num * total)
    return {
        "usage": float((counts > 0).double().mean()),
        "perplexity": float(entropy.exp()),
        "gini": float(gini),
    }


def collision_stats(codes: Tensor, code_num: int) -> dict[str, Any]:
    """Health of a code table (N, L) without suffix (definitions in the module docstring).

    Returns:
        ``collision_rate``, ``collided_share``, ``n_distinct``, ``max_group``, ``gini`` (mean over levels),
        ``min_usage`` and per level ``usage_l{i}``, ``perplexity_l{i}``, ``gini_l{i}`` (i from 1).
    """
    codes = codes.long().cpu()
    n = codes.shape[0]
    _, counts = _groups(codes)
    shared = int(counts[counts > 1].sum())
    out: dict[str, Any] = {
        "collision_rate": (n - len(counts)) / n,
        "collided_share": shared / n,
        "n_distinct": len(counts),
        "max_group": int(counts.max()),
    }
    per_level = [level_stats(codes[:, l], code_num) for l in range(codes.shape[1])]
    for l, s in enumerate(per_level, start=1):
        for key, value in s.items():
            out[f"{key}_l{l}"] = value
    out["gini"] = sum(s["gini"] for s in per_level) / len(per_level)
    out["min_usage"] = min(s["usage"] for s in per_level)
    return out


def build_item_codes(
    model: Any,
    vectors: Tensor,
    code_num: int,
    sk_epsilons: Sequence[float] | None = None,
    sk_iters: int = 50,
    previous: Tensor | None = None,
    margins: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """The item-code table of a tokenizer: (N, d_s) vectors -> ((N, L+1) codes with suffix, collision stats).

    Args:
        model: an ``RQVAE``.
        vectors: item vectors, row j = item id j+1.
        code_num: codebook size (bound for the suffix).
        sk_epsilons: optional Sinkhorn at assignment time (None = nearest code, as joint training does).
        sk_iters: Sinkhorn rounds.
        previous: (N, L) or (N, L+1) codes of the last table; with ``margins``, an item keeps its previous code
            at a level unless another code is nearer by more than that level's margin.
        margins: (L,) squared-distance margins (see ``ResidualQuantizer.codes_with_margin``).
    """
    if previous is not None and margins is not None:
        levels = len(margins)
        codes = model.codes_with_margin(vectors, previous[:, :levels], margins, sk_epsilons, sk_iters)  # (N, L)
    else:
        codes = model.get_codes(vectors, sk_epsilons=sk_epsilons, sk_iters=sk_iters)  # (N, L)
    stats = collision_stats(codes, code_num)
    return add_suffix(codes, code_num), stats
