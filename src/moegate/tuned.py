"""Overlay tuned values onto a config: how a stage reads what the studies before it chose.

``tuning/{study}.json`` holds ``{"study": ..., "params": {"dotted.config.key": value, ...}, ...}``.
A study run with ``n_trials: 0`` writes empty params, so the config's own values stand. A param under
a renamed key (``router.lambda_``, before ``router.ponder_cost``) is applied under its new name, with a
FutureWarning (:func:`moegate.config.current_key`).
"""

from __future__ import annotations

import copy
from pathlib import Path

from moegate.config import ConfigError, current_key, set_dotted
from moegate.io import read_json
from moegate.layout import Layout


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
            try:
                set_dotted(out, current_key(key, f"{path}: params"), value)
            except ConfigError as e:
                raise ConfigError(f"{path}: params: {e}") from None
        used[study] = tuned
    return out, used
