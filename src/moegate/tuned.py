"""Overlay tuned values onto a config: how a stage reads what the studies before it chose.

``tuning/{study}.json`` holds ``{"study": ..., "params": {"dotted.config.key": value, ...}, ...}``.
A study run with ``n_trials: 0`` writes empty params, so the config's own values stand.
"""

from __future__ import annotations

import copy
from pathlib import Path

from moegate.io import read_json
from moegate.layout import Layout


def set_dotted(config: dict, dotted: str, value) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for key in parents:
        if key not in node or not isinstance(node[key], dict):
            raise KeyError(f"tuned parameter {dotted!r}: config has no section {key!r}")
        node = node[key]
    node[leaf] = value


def apply_tuned(config: dict, studies: tuple[str, ...], layout: Layout | None = None) -> tuple[dict, dict]:
    """Return (a copy of config with each study's params applied in order, {study: tuned json})."""
    layout = layout or Layout.from_config(config)
    out = copy.deepcopy(config)
    used = {}
    for study in studies:
        path: Path = layout.tuned(study)
        if not path.exists():
            continue
        tuned = read_json(path)
        for key, value in tuned.get("params", {}).items():
            set_dotted(out, key, value)
        used[study] = tuned
    return out, used
