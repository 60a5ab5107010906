"""The rewrite report: what was found in the graph, what changed where, and what it costs.

``print(report)`` shows one row per attention site; ``report.attention_sites`` is the list of
:class:`SiteRecord` behind it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

FOUND, REWRITTEN, SKIPPED = "found", "rewritten", "skipped"
# the words of the note an option that was asked for and rewrote nothing leaves: "<option>: changed nothing: <why>"
UNCHANGED = "changed nothing"


@dataclass
class SiteRecord:
    """One attention site as the report shows it.

    module:  qualified module name, e.g. ``blocks.3.attn`` (``?`` when the graph has no module stack)
    q_shape / kv_shape: shapes of the query and key tensors ([B, H, N, D])
    history: what each pass (and the analysis) did to the site, in order: ``(pass, status, reason)``
             with status found / rewritten / skipped; a site can be rewritten by merge and skipped
             by sparse attention, and the report shows both
    """

    module: str
    layer: Optional[int]
    kind: str  # "sdpa" or "manual"
    q_shape: tuple
    kv_shape: tuple
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    has_mask: bool
    role: str = "self-attention"  # self-attention, cached decode, class attention, pooled-KV self-attention, cross-attention
    history: list = field(default_factory=list)

    def mark(self, status: str, reason: str = "", pass_name: str | None = None) -> None:
        """Record what ``pass_name`` did (None: the analysis); a pass's later mark replaces its own."""
        name = pass_name or ANALYSIS
        self.history = [h for h in self.history if h[0] != name] + [(name, status, reason)]

    @property
    def status(self) -> str:
        """rewritten if any pass rewrote the site, else skipped if any skipped it, else found."""
        statuses = {status for _, status, _ in self.history}
        return next((s for s in (REWRITTEN, SKIPPED) if s in statuses), FOUND)

    @property
    def reason(self) -> str:
        """Every pass's reason, in the order they ran."""
        return "; ".join(reason for _, _, reason in self.history if reason)

    @property
    def passes(self) -> list:
        """The passes that marked the site."""
        return [name for name, _, _ in self.history if name != ANALYSIS]

    def status_of(self, pass_name: str) -> Optional[str]:
        """What ``pass_name`` did to the site (None: it did not mark it)."""
        return next((status for name, status, _ in self.history if name == pass_name), None)

    def reason_of(self, pass_name: str) -> str:
        return next((reason for name, _, reason in self.history if name == pass_name), "")

    @property
    def status_text(self) -> str:
        """The status column: one status, or each pass's where they differ ("rewritten/skipped")."""
        statuses = list(dict.fromkeys(status for _, status, _ in self.history))
        return "/".join(statuses) if len(statuses) > 1 else self.status


ANALYSIS = "analysis"


@dataclass
class Report:
    """Everything tokred did to one captured graph (or, merged, to a whole model)."""

    attention_sites: list = field(default_factory=list)
    projections: dict = field(default_factory=dict)  # role -> count
    blocks: int = 0
    token_count: Optional[int] = None
    prefix_tokens: int = 0
    readout_positions: list = field(default_factory=list)
    flops_before: float = 0.0
    flops_after: float = 0.0
    notes: list = field(default_factory=list)
    graphs: int = 0
    sources: list = field(default_factory=list)  # merge trace_source: [B, N] merged-token ids per run
    kv_cache_bytes: tuple = (0, 0)  # the KV cache a prefill returns, before and after kv_cache (bytes)

    def note(self, line: str) -> None:
        if line not in self.notes:
            self.notes.append(line)

    @property
    def changed(self) -> bool:
        """Whether any pass rewrote any site."""
        return any(s.status == REWRITTEN for s in self.attention_sites)

    def merge(self, other: "Report") -> None:
        """Fold the report of another captured graph (a graph break) into this one."""
        self.attention_sites.extend(other.attention_sites)
        for role, n in other.projections.items():
            self.projections[role] = self.projections.get(role, 0) + n
        self.blocks += other.blocks
        self.token_count = self.token_count or other.token_count
        self.prefix_tokens = max(self.prefix_tokens, other.prefix_tokens)
        self.readout_positions = sorted(set(self.readout_positions) | set(other.readout_positions))
        self.flops_before += other.flops_before
        self.flops_after += other.flops_after
        for line in other.notes:
            self.note(line)
        self.sources.extend(other.sources)
        self.graphs += other.graphs
        self.kv_cache_bytes = tuple(a + b for a, b in zip(self.kv_cache_bytes, other.kv_cache_bytes))

    def table(self) -> str:
        headers = ["module", "layer", "kind", "attention", "q [B,H,N,D]", "kv [B,H,N,D]", "heads", "kv_heads",
                   "head_dim", "causal", "mask", "status", "reason"]
        rows = [[s.module, "" if s.layer is None else str(s.layer), s.kind, s.role,
                 "x".join(map(str, s.q_shape)), "x".join(map(str, s.kv_shape)), str(s.heads),
                 str(s.kv_heads), str(s.head_dim), "yes" if s.causal else "no",
                 "yes" if s.has_mask else "no", s.status_text, s.reason]
                for s in self.attention_sites]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
                  for i, h in enumerate(headers)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        out = [line(headers), line(["-" * w for w in widths])]
        out += [line(r) for r in rows]
        return "\n".join(out)

    def __str__(self) -> str:
        parts = ["tokred report"]
        if not self.attention_sites:
            parts.append("no attention found: the model passes through unchanged")
        else:
            parts.append(self.table())
        summary = [f"attention sites: {len(self.attention_sites)}", f"blocks: {self.blocks}"]
        if self.token_count is not None:
            summary.append(f"tokens: {self.token_count} ({self.prefix_tokens} prefix)")
        if self.readout_positions:
            summary.append("read out at " + ", ".join(map(str, self.readout_positions)))
        if self.projections:
            summary.append("projections: " + ", ".join(f"{k} {v}" for k, v in sorted(self.projections.items())))
        parts.append("; ".join(summary))
        if self.flops_before:
            ratio = self.flops_after / self.flops_before
            parts.append(f"FLOPs: {_fmt_flops(self.flops_before)} before, {_fmt_flops(self.flops_after)} after "
                         f"({ratio:.3f}x)")
        if self.kv_cache_bytes[0]:
            before, after = self.kv_cache_bytes
            parts.append(f"KV cache after the prefill: {before / 2 ** 20:.2f} MiB before, {after / 2 ** 20:.2f} MiB "
                         f"after ({after / before:.3f}x)")
        parts += [f"note: {n}" for n in self.notes]
        return "\n".join(parts)

    __repr__ = __str__


def note_unchanged(report: Report, name: str, reason: str) -> None:
    """Say that the option ``name`` was asked for and changed nothing, and why (once per option)."""
    if not any(n.startswith(f"{name}: {UNCHANGED}") for n in report.notes):
        report.note(f"{name}: {UNCHANGED}: {reason}")


class TokredWarning(UserWarning):
    """A rewrite asked for changed nothing in a captured graph (the report's note says why)."""


def warn_unchanged(report: Report, names) -> Optional[str]:
    """Warn once for this graph if a pass of ``names`` changed nothing in it (or was undone): a
    user of ``backend="tokred"`` sees no report. The warning names each such pass and its first
    reason, from the report's notes; returns its text (None: every pass changed something)."""
    import warnings

    names = list(names)
    lines = [n for n in report.notes if names and n.startswith("analysis failed")]
    for name in names:
        note = next((n for n in report.notes
                     if n.startswith(f"{name}: {UNCHANGED}") or n.startswith(f"{name}: not applied")), None)
        if note is not None:
            lines.append(note)
    if not lines:
        return None
    text = (f"tokred: in a captured graph ({len(report.attention_sites)} attention sites, {report.blocks} "
            f"blocks): " + " | ".join(lines))
    warnings.warn(text, TokredWarning, stacklevel=3)
    return text


def unchanged_reason(report: Report, name: str) -> Optional[str]:
    """Why the pass ``name`` rewrote no attention site, in words, from the sites it marked; None
    where it rewrote one. E.g. "the graph has no attention sites", or "every site skipped:
    sink_window needs causal attention (this site is bidirectional) (12 sites)"."""
    sites = report.attention_sites
    if not sites:
        return "the graph has no attention sites"
    if any(s.status_of(name) == REWRITTEN for s in sites):
        return None
    skipped = Counter(s.reason_of(name).removeprefix(f"{name}: ") for s in sites if s.status_of(name) == SKIPPED)
    if not skipped:
        kept = Counter(s.reason_of(name).removeprefix(f"{name}: ") for s in sites
                       if s.status_of(name) == FOUND and s.reason_of(name))  # planned, but left as they were
        if kept:
            return "every site left as it was: " + "; ".join(
                f"{reason} ({n} site{'s' if n > 1 else ''})" for reason, n in kept.items())
        return f"none of the {len(sites)} attention sites was selected"
    parts = [f"{reason} ({n} site{'s' if n > 1 else ''})" for reason, n in skipped.items()]
    head = "every site skipped" if sum(skipped.values()) == len(sites) else "every selected site skipped"
    return f"{head}: " + "; ".join(parts)


def _fmt_flops(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} "
