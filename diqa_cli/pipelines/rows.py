"""The rows every pipeline yields, and small helpers they share.

A row is a dict with at least ``path, score, raw_score, status ('ok'|'error'), error`` plus the
run's context (``method``, ``backbone``…). ``score = raw_score * scale + offset`` with the head's
score normalisation; an input that cannot be scored has ``status='error'``, no score and a
one-line ``error``.
"""

from __future__ import annotations

from typing import Any

from diqa_cli.errors import one_line

__all__ = ["error_row", "failure_reason", "reported_score", "tree_cat", "tree_map"]


def error_row(path: str, reason: str, **context: Any) -> dict[str, Any]:
    """The row of an input that could not be scored."""
    return {"path": path, "score": None, "raw_score": None, "status": "error", "error": reason, **context}


def failure_reason(exc: BaseException) -> str:
    """The error text of an input whose scoring raised ``exc`` (out of memory, an odd input…)."""
    return f"scoring failed: {type(exc).__name__}: {one_line(exc)}"


def reported_score(raw: float, normalisation: dict) -> float:
    """A raw model output on the head's reported scale (``raw * scale + offset``)."""
    return raw * float(normalisation["scale"]) + float(normalisation["offset"])


def tree_map(fn, tree):
    """``fn`` applied to every tensor of a nest of dicts, lists and tuples (model features)."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, v) for v in tree)
    return fn(tree)


def tree_cat(trees: list):
    """Concatenate same-shaped nests of tensors along their first dimension."""
    import torch

    first = trees[0]
    if isinstance(first, dict):
        return {k: tree_cat([t[k] for t in trees]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(tree_cat([t[i] for t in trees]) for i in range(len(first)))
    return torch.cat(trees)
