"""prune's options: the typed dataclass, its validation (the errors users see, naming the
option), and which blocks of a captured graph ``at`` names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from tokred.rewriter.options import is_layer_entry, names_module
from tokred.rewriter.tokens import kept_count  # noqa: F401  (the pass's count, re-exported)

SCORES = ("cls", "query", "transition", "diversity", "random")
ATTENTION_SCORES = ("cls", "query")
KNOWN = ("keep", "at", "score", "fuse", "range", "prunable_ids", "protect_last", "query", "accumulate", "pool",
         "seed", "trace_source")
ACCUMULATED_SCORES = ("cls", "query", "transition")
POOLED_SCORES = ACCUMULATED_SCORES  # scores that rank tokens by a per-token value a window can average


# ----------------------------------------------------------------------------- options

def _error(key: str, message: str) -> ValueError:
    return ValueError(f"tokred option 'prune.{key}' {message}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_keep(value) -> None:
    if _is_int(value):
        if value < 1:
            raise _error("keep", f"as a count must be >= 1, got {value}")
    elif isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise _error("keep", f"as a fraction must be in (0, 1], got {value}")
    else:
        raise _error("keep", f"must be a fraction in (0, 1], a count >= 1 or a list of them, got {value!r}")


def _check_pair(key: str, value) -> Optional[tuple]:
    if value is None:
        return None
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) for v in value)):
        raise _error(key, f"must be a (start, end) pair of ints, got {value!r}")
    return tuple(value)


def _check_query(value) -> Optional[tuple]:
    """The query rows of score 'query': None (the last token), an int M (the last M tokens) or a
    (start, end) pair, negative values counting from the end and end None meaning the last token."""
    if value is None:
        return None
    if _is_int(value):
        if value < 1:
            raise _error("query", f"must be a count of last tokens >= 1 or a (start, end) pair, got {value!r}")
        return (-value, None)
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and _is_int(value[0])
            and (value[1] is None or _is_int(value[1]))):
        raise _error("query", f"must be a count of last tokens or a (start, end) pair of ints, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class PruneOptions:
    """keep: per cut, a fraction of the prunable tokens or a count; at: the blocks cut after
    (sorted); score: how tokens are ranked (None: "query" on causal models, else "cls"); fuse:
    the pruned tokens' weighted mean is kept as one token (EViT); range / prunable_ids /
    protect_last: which tokens may be pruned; query: score 'query''s rows; accumulate: blocks whose
    scores are summed; pool: an odd window the scores are averaged over; seed: score 'random''s;
    trace_source: record each token's exit block (tokred.explain)."""

    keep: tuple = (0.5,)
    at: tuple = (1,)
    score: Optional[str] = None
    fuse: bool = False
    range: Optional[tuple] = None
    prunable_ids: Optional[tuple] = None
    trace_source: bool = False
    protect_last: int = 0
    query: Optional[tuple] = None
    accumulate: int = 1
    pool: int = 1
    seed: int = 0

    @classmethod
    def parse(cls, value: Any) -> "PruneOptions":
        return cls(**_parse(value))


def _parse(value: Any) -> dict:
    """``{"keep", "at", "score", "fuse", "range", "prunable_ids", "protect_last", "query", "accumulate",
    "pool", "seed", "trace_source"}``; a float is keep."""
    if isinstance(value, float):
        value = {"keep": value}
    if not isinstance(value, dict):
        raise ValueError(f"tokred option 'prune' must be a dict like {{'keep': 0.5, 'at': [2]}}, got {value!r}")
    for key in value:
        if key not in KNOWN:
            raise ValueError(f"unknown tokred option 'prune.{key}'; known: {', '.join(KNOWN)}")
    at = value.get("at", [1])
    at = [at] if is_layer_entry(at) else at
    if not (isinstance(at, (list, tuple)) and at and all(is_layer_entry(a) for a in at)):
        raise _error("at", f"must be a block (its index >= 0 in the graph, or its module path such as "
                           f"'language_model.layers.2') or a non-empty list of them, got {value.get('at')!r}")
    if len(set(at)) != len(at):
        raise _error("at", f"lists a block twice: {list(at)}")
    keep = value.get("keep", 0.5)
    keeps = list(keep) if isinstance(keep, (list, tuple)) else [keep] * len(at)
    if len(keeps) != len(at):
        raise _error("keep", f"lists {len(keeps)} values for {len(at)} cuts in 'prune.at'")
    for k in keeps:
        _check_keep(k)
    score = value.get("score")
    if score is not None and score not in SCORES:
        raise _error("score", f"must be one of {SCORES}, got {score!r}")
    for flag in ("fuse", "trace_source"):
        if flag in value and not isinstance(value[flag], bool):
            raise _error(flag, f"must be True or False, got {value[flag]!r}")
    protect_last = value.get("protect_last", 0)
    if not _is_int(protect_last) or protect_last < 0:
        raise _error("protect_last", f"must be an int >= 0, got {protect_last!r}")
    seed = value.get("seed", 0)
    if not _is_int(seed):
        raise _error("seed", f"must be an int, got {seed!r}")
    ids = value.get("prunable_ids")
    if ids is not None:
        ids = [ids] if _is_int(ids) else ids
        if not (isinstance(ids, (list, tuple)) and ids and all(_is_int(i) and i >= 0 for i in ids)):
            raise _error("prunable_ids", f"must be a token id or a non-empty list of them, got {value['prunable_ids']!r}")
        ids = tuple(ids)
    query = _check_query(value.get("query"))
    if query is not None and score not in (None, "query"):
        raise _error("query", "applies to score 'query' only")
    accumulate = value.get("accumulate", 1)
    if not _is_int(accumulate) or accumulate < 1:
        raise _error("accumulate", f"must be a count of blocks >= 1, got {accumulate!r}")
    if accumulate > 1 and score not in (None,) + ACCUMULATED_SCORES:
        raise _error("accumulate", f"applies to the scores {ACCUMULATED_SCORES} only, not {score!r}")
    pool = value.get("pool", 1)
    if not _is_int(pool) or pool < 1 or pool % 2 == 0:
        raise _error("pool", f"must be an odd window of positions >= 1 (1: no pooling), got {pool!r}")
    if pool > 1 and score not in (None,) + POOLED_SCORES:
        raise _error("pool", f"applies to the scores {POOLED_SCORES} only, not {score!r}")
    if all(_is_int(a) for a in at):
        _check_cuts(at, accumulate)
    return {"keep": tuple(keeps), "at": tuple(at), "score": score,
            "fuse": value.get("fuse", False), "range": _check_pair("range", value.get("range")),
            "prunable_ids": ids, "trace_source": value.get("trace_source", False),
            "protect_last": protect_last, "query": query, "accumulate": accumulate, "pool": pool, "seed": seed}


def _check_cuts(at: list, accumulate: int) -> None:
    """The blocks each cut scores (``accumulate`` ending at it) all see the same token set."""
    cuts = sorted(at)
    for previous, cut in zip([-1] + cuts, cuts):
        if cut - accumulate < previous:
            where = "before the first block" if previous < 0 else \
                f"at or before the earlier cut after block {previous}"
            raise _error("accumulate", f"{accumulate} blocks ending at block {cut} start at block "
                         f"{cut - accumulate + 1}, {where}")


def resolve_cuts(opts: "PruneOptions", blocks: list) -> list:
    """[(block index, keep)] of the graph's blocks that ``opts.at`` names, sorted: an index as it
    is, a module path by :func:`names_module` (a path naming no block of this graph names a block
    of another graph, e.g. the other tower of a VLM, and is left out)."""
    cuts = []
    for entry, keep in zip(opts.at, opts.keep):
        if _is_int(entry):
            cuts.append((entry, keep))
            continue
        named = [b.index for b in blocks if names_module(entry, b.module)]
        if len(named) > 1:
            raise _error("at", f"{entry!r} names {len(named)} blocks of one graph "
                               f"({', '.join(blocks[i].module for i in named)}); name one")
        cuts.extend((i, keep) for i in named)
    if len({i for i, _ in cuts}) != len(cuts):
        raise _error("at", f"names a block twice: {list(opts.at)}")
    _check_cuts([i for i, _ in cuts], opts.accumulate)
    return sorted(cuts)
