"""Shared fixtures: a small valid config, tiny random-weight backbones, and quiet CPU threading."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def in_ci() -> bool:
    """True when the environment says CI (CI=true, 1 or yes: what CI systems and .ci/run set)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def service_unavailable(reason: str) -> NoReturn:
    """Skip a test whose server (PostgreSQL, Slurm, llama.cpp) cannot run here, or fail it under CI.

    Locally a missing server is a skip with ``reason``; in CI it is a failure, since CI would otherwise
    go green having tested none of them (tests/services/install.sh also fails there first).
    """
    if in_ci():
        pytest.fail(f"{reason} (CI is set: a service test fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # 2-core machines run several test processes; one thread each keeps them from thrashing
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    yield


def write_config(tmp_path: Path, **sections) -> Path:
    """A valid config for a run under tmp_path/results; keyword args replace whole top-level keys."""
    config = {
        "results": str(tmp_path / "results"),
        "experts": {
            "dsci_101": {"source": str(DEMO / "dsci_101_data.jsonl")},
            "dsci_dl_510": {"source": str(DEMO / "dsci_dl_510_data.jsonl")},
            "dsci_vis_510": {"source": str(DEMO / "dsci_vis_510_data.jsonl")},
        },
    }
    config.update(sections)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def config_path(tmp_path):
    return write_config(tmp_path)


def _minilm_tokenizer_dir() -> Path:
    from moegate.encoder import resolve_model

    return Path(resolve_model("all-MiniLM-L6-v2"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 3-layer, hidden-32 random BertModel saved with MiniLM's (real) tokenizer: builds in ~1 s."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny_bert")
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(_minilm_tokenizer_dir()).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_distilbert_dir(tmp_path_factory) -> Path:
    """A 2-layer, dim-32 random DistilBertModel with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    out = tmp_path_factory.mktemp("tiny_distilbert")
    cfg = DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                           max_position_embeddings=128)
    DistilBertModel(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(_minilm_tokenizer_dir()).save_pretrained(out)
    return out


@pytest.fixture
def demo_copy(tmp_path) -> Path:
    """The shipped demo KBs copied to tmp (tests may damage their copy)."""
    dst = tmp_path / "demo"
    shutil.copytree(DEMO, dst)
    return dst


# -- training stages (train_backbone, train_router, evaluate): a tiny labelled run ----------------
TINY_TOPICS = {  # a few words only one expert's questions use, so a tiny random model can learn them
    "dsci_101": ["median", "variance", "sample", "histogram", "mean", "survey", "spreadsheet", "average"],
    "dsci_dl_510": ["gradient", "neuron", "backpropagation", "layer", "tensor", "epoch", "dropout", "optimizer"],
    "dsci_vis_510": ["chart", "colour", "axis", "legend", "scatterplot", "palette", "dashboard", "encoding"],
}


def tiny_questions(per_expert: int = 24, seed: int = 0) -> list[tuple[str, str]]:
    """(question, expert) pairs built from TINY_TOPICS; deterministic for a seed."""
    import random

    rng = random.Random(seed)
    rows = []
    for expert, words in TINY_TOPICS.items():
        for _ in range(per_expert):
            a, b = rng.sample(words, 2)
            rows.append((f"how does the {a} relate to the {b} in question {rng.randint(1, 999)}?", expert))
    return rows


@pytest.fixture
def tiny_run(tmp_path, tiny_bert_dir) -> dict:
    """A validated config (tiny_bert_dir backbone, CPU, 2 epochs, the finetune router) whose results dir
    holds a real dataset stage output for 72 labelled questions (moegate.stages.dataset with
    dataset.labelled_csv)."""
    import csv

    from moegate.config import load
    from moegate.stages.dataset import dataset

    questions = tmp_path / "questions.csv"
    with questions.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "expert"])
        writer.writerows(tiny_questions())
    loop = {"learning_rate": 3.0e-3, "batch_size": 8, "epochs": 2, "warmup_ratio": 0.1}
    path = write_config(
        tmp_path,
        device="cpu",
        dataset={"labelled_csv": str(questions), "val_fraction": 0.2, "test_fraction": 0.2, "max_length": 24},
        backbone={"model": str(tiny_bert_dir), **loop},
        router={"head": {"projection_dim": 16, "width": 16}, **loop, "ponder_cost": 0.01, "encoder_mode": "finetune",
                "ponder_cost_grid": [], "probe": {"epochs": 3, "batch_size": 8}},
    )
    config = load(path)
    dataset(config)
    return config


# -- tuning storage: a real PostgreSQL (tests/services/postgres.py) --------------------------------
@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for this test session (password auth on 127.0.0.1); skips when unavailable
    (fails under CI, see service_unavailable).
    ``postgres.database()`` makes an empty database and returns its URL without the password."""
    import sys

    sys.path.insert(0, str(REPO / "tests" / "services"))
    from postgres import PostgresServer, unavailable_reason

    reason = unavailable_reason()
    if reason:
        service_unavailable(reason)
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()
