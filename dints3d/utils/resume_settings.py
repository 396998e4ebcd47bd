"""Did the settings change between a run and the run that resumes it? One comparison for the supernet search
(``dints3d search --resume``), the random search (``random_search.json``) and the bundle's training
(``resume_mode: same_settings``); each caller decides which changes it allows and how it words them."""

from __future__ import annotations

from typing import Any, Iterable, Mapping


def leaves(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested mappings → dotted keys: ``{"search": {"lr": 0.1}}`` → ``{"search.lr": 0.1}``. Lists are leaves; an empty
    mapping has none (``{"plan": {}}`` gives ``{}``)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(before: Mapping, now: Mapping) -> dict[str, tuple[Any, Any]]:
    """Dotted key → (before, now) for every leaf that differs, in key order; a missing leaf counts as ``None``."""
    then, current = leaves(before), leaves(now)
    return {key: (then.get(key), current.get(key)) for key in sorted({*then, *current})
            if then.get(key) != current.get(key)}


def split_changes(changes: Mapping[str, tuple[Any, Any]],
                  may_change: Iterable[str]) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """(allowed, refused) changes: a key is allowed when it is in ``may_change`` or lies under one of its entries
    (``"search"`` allows ``"search.lr"``)."""
    prefixes = tuple(may_change)

    def allowed(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    return ({k: v for k, v in changes.items() if allowed(k)}, {k: v for k, v in changes.items() if not allowed(k)})
