"""Warm start: a router for a new expert set trained from the previous router, not from nothing.

When an expert is added to (or removed from) a finished run, train_router starts from the router the
run had (``router.warm_start``, :func:`choose`): every weight is carried over (the encoder, the shared
projection, the layer centres, the halting heads, the prototype scales), and the classifier's rows are
matched by expert NAME (:func:`carry_over`): an old expert keeps its prototypes (or its output row of an
``mlp`` classifier), a new expert's prototypes are k-means centroids of its own rows' states, as in a
fresh router (an ``mlp`` row keeps its fresh initialisation), and a removed expert's rows are dropped.
Then the units train as usual on the new dataset's cached states.

``router.warm_start``:
- ``auto`` (default): the router this results dir's last train_router wrote, kept as hard links in
  ``results/cache/router/`` (Snakemake deletes ``router/``'s files before train_router reruns; run by
  hand, ``router/`` itself is read when the snapshot is missing), when its expert set differs from the
  dataset's, the two share an expert, and its encoder and head config equal this run's. The same expert
  set trains from nothing, so a rerun after a KB edit or a config change is the router the config says.
- a path to a router directory: start from it whenever it is compatible (the same checks).
- ``null``: always from nothing.

Only ``router.encoder_mode: frozen`` warm-starts (the units train on the pretrained encoder's cached
states; a finetune/lpft router's encoder is not the one those states come from): other modes train
from nothing and say why in ``config.json`` → ``metadata.warm_start``. That record names the experts
carried over and added; a removed expert is only counted, so the new router holds no trace of it.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from moegate.io import atomic_dir
from moegate.layout import Layout
from moegate.models.dact import DactRouterModel, HeadConfig

log = logging.getLogger(__name__)

AUTO = "auto"


@dataclass
class WarmStart:
    """A previous router's weights and what they were trained for."""

    path: Path
    labels: list[str]
    state: dict[str, torch.Tensor]
    ponder_cost: float | None
    config: dict  # its config.json


def previous_router(layout: Layout) -> Path | None:
    """The router ``auto`` starts from: the snapshot of the last train_router, else ``router/`` itself
    when it is whole (a hand run), else None."""
    for path in (layout.previous_router, layout.router):
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return path
    return None


def choose(config: dict, labels: list[str]) -> tuple[WarmStart | None, dict]:
    """The router to warm-start from for a run with ``labels`` (config already overlaid with tuned values),
    or None; and the record of the decision (``metadata.warm_start``: setting, used, why, from)."""
    from moegate.router import Router, RouterError

    setting = config["router"].get("warm_start", AUTO)
    record = {"setting": setting, "used": False}
    if setting is None:
        return None, {**record, "why": "router.warm_start is null"}
    layout = Layout.from_config(config)
    path = previous_router(layout) if setting == AUTO else Path(setting)
    if path is None:
        return None, {**record, "why": "no previous router in this results dir"}
    if config["router"]["encoder_mode"] != "frozen":
        return None, {**record, "why": f"router.encoder_mode is {config['router']['encoder_mode']}, "
                                       "warm start needs frozen"}
    try:
        previous = Router.from_pretrained(path, device="cpu")
    except (OSError, RouterError) as e:
        if setting != AUTO:  # a router the user named must load
            raise
        log.warning("warm start: the previous router %s does not load (%s); training from nothing", path, e)
        return None, {**record, "why": "the previous router does not load"}
    meta = previous.config.get("metadata") or {}
    head = HeadConfig(**config["router"]["head"]).to_dict()
    mismatch = []
    if meta.get("encoder_mode") != "frozen":
        mismatch.append(f"its encoder_mode is {meta.get('encoder_mode')}")
    if meta.get("backbone_model") != config["backbone"]["model"]:
        mismatch.append(f"its encoder is {meta.get('backbone_model')}, this run's {config['backbone']['model']}")
    if previous.config.get("head") != head:
        differ = sorted(k for k in head if (previous.config.get("head") or {}).get(k) != head[k])
        mismatch.append(f"its head config differs ({', '.join(differ)})")
    shared = [e for e in labels if e in previous.labels]
    if not shared:
        mismatch.append("it shares no expert with this run")
    if mismatch:
        if setting != AUTO:
            log.warning("warm start: %s cannot be carried over (%s); training from nothing", path, "; ".join(mismatch))
        return None, {**record, "why": "; ".join(mismatch)}
    if setting == AUTO and sorted(previous.labels) == sorted(labels):
        return None, {**record, "why": "the expert set did not change"}
    state = {k: v.detach().clone() for k, v in previous.model.state_dict().items()}
    return (WarmStart(path, list(previous.labels), state, previous.ponder_cost, previous.config),
            {**record, "used": True, "from": str(path)})


def per_expert_rows(model: DactRouterModel) -> dict[str, int]:
    """State-dict keys whose first axis holds rows per expert, with the rows each expert owns: the
    prototypes of every layer (M each), or the output layer of every ``mlp`` classifier (1 each)."""
    keys = {}
    for n, head in enumerate(model.classifiers):
        if hasattr(head, "per_expert"):  # a prototype head
            keys[f"classifiers.{n}.prototypes"] = head.per_expert
        else:
            last = len(head) - 1
            keys[f"classifiers.{n}.{last}.weight"] = keys[f"classifiers.{n}.{last}.bias"] = 1
    return keys


@torch.no_grad()
def carry_over(model: DactRouterModel, warm: WarmStart, labels: list[str]) -> dict:
    """Load ``warm``'s weights into ``model`` (built for ``labels``), classifier rows matched by expert
    name. Returns {carried: [experts], new: [experts], new_index: [their label indices], removed: count}."""
    rows = per_expert_rows(model)
    target = model.state_dict()
    old_index = {e: i for i, e in enumerate(warm.labels)}
    missing = sorted(set(target) - set(warm.state))
    unexpected = sorted(set(warm.state) - set(target))
    if missing or unexpected:
        raise ValueError(f"warm start from {warm.path}: its weights do not fit this router (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    # a weight the config fixes (router.head.kb_scale) is this config's, not the previous router's
    fixed = {name for name, p in model.named_parameters() if not p.requires_grad and name not in rows}
    merged = {}
    for key, value in target.items():
        old = warm.state[key]
        if key in fixed:
            merged[key] = value
        elif key in rows:
            m = rows[key]
            new = value.clone()
            for j, expert in enumerate(labels):
                if expert in old_index:
                    i = old_index[expert]
                    new[j * m:(j + 1) * m] = old[i * m:(i + 1) * m]
            merged[key] = new
        elif old.shape != value.shape:
            raise ValueError(f"warm start from {warm.path}: tensor {key} is {tuple(old.shape)}, this router's "
                             f"{tuple(value.shape)}")
        else:
            merged[key] = old
    model.load_state_dict(merged, strict=True)
    new = [e for e in labels if e not in old_index]
    return {"carried": [e for e in labels if e in old_index], "new": new,
            "new_index": [labels.index(e) for e in new], "removed": sum(e not in labels for e in warm.labels)}


def snapshot(router_dir: Path, dest: Path) -> None:
    """Keep the router directory ``router_dir`` as ``dest`` (hard links; copies where links fail), swapped
    in whole: the router the next ``auto`` warm start reads."""
    with atomic_dir(dest) as tmp:
        for src in sorted(router_dir.rglob("*")):
            out = tmp / src.relative_to(router_dir)
            if src.is_dir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, out)
            except OSError:
                shutil.copy2(src, out)
