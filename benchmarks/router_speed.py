"""Router speed and accuracy against the alternatives, on one machine in one run.

    python benchmarks/router_speed.py --config config.yaml
    python benchmarks/router_speed.py --config workflow/configs/openstax.yaml \
        --real-questions ../shared/data/questions/mmlu_openstax_dev.csv

Reads a finished run (results/{dataset,backbone,router,kb}) and prints one table: CPU latency per
query at batch 1 (p50, p99, tokenization included), throughput at batch 64, accuracy on the test split
(and on real questions when given), and the mean exit layer, for

  router (early exit)   the DACT router, each question halting when its answer can no longer change
  router (full depth)   the same weights forced through every layer
  backbone classifier   the fine-tuned backbone with its [CLS] head (what the router starts from)
  tfidf + logreg        word 1-2-gram TF-IDF + logistic regression on the same training questions
  retrieval routing     no router at all: embed the question with the KB encoder and pick the expert
                        whose top-10 KB chunks score highest on average

Timings are wall-clock on whatever else the machine is doing: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from moegate.config import load
from moegate.encoder import embed
from moegate.io import read_json
from moegate.layout import Layout


class Method:
    """A routing method: predict(texts) -> (labels as int array, exit layers or None)."""

    name = ""

    def predict(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError


class RouterMethod(Method):
    def __init__(self, path: Path, early_exit: bool):
        from moegate.router import Router

        self.router = Router.from_pretrained(path, device="cpu")
        self.early_exit = early_exit
        self.name = "router (early exit)" if early_exit else "router (full depth)"

    def predict(self, texts):
        probs, layers = self.router.predict(texts, early_exit=self.early_exit, batch_size=len(texts))
        return probs.argmax(1), layers


class BackboneMethod(Method):
    name = "backbone classifier"

    def __init__(self, path: Path, max_length: int):
        from moegate.models.backbone import load_backbone_classifier

        self.encoder, self.head, self.tokenizer, self.labels = load_backbone_classifier(path)
        self.encoder.eval().cpu()
        self.head.eval().cpu()
        self.max_length = max_length
        self.layers = self.encoder.config.num_hidden_layers if hasattr(self.encoder.config, "num_hidden_layers") \
            else self.encoder.config.n_layers

    @torch.inference_mode()
    def predict(self, texts):
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        hidden = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = self.head(hidden[:, 0])
        return logits.argmax(1).numpy(), np.full(len(texts), self.layers)


class TfidfMethod(Method):
    name = "tfidf + logreg"

    def __init__(self, train: pd.DataFrame, seed: int):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        self.model = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
            LogisticRegression(max_iter=2000, C=10.0, random_state=seed),
        )
        self.model.fit(train["query"].tolist(), train["label"].to_numpy())

    def predict(self, texts):
        return self.model.predict(texts), None


class RetrievalMethod(Method):
    name = "retrieval routing"

    def __init__(self, layout: Layout, labels: list[str], config: dict, top_k: int = 10):
        enc = config["encoder"]
        self.encoder, self.max_length, self.top_k = enc["model"], enc["max_length"], top_k
        chunks, owner = [], []
        for i, expert in enumerate(labels):
            kb = pd.read_parquet(layout.kb(expert))
            vectors = np.stack(kb["embedding"].to_numpy()).astype(np.float32)
            probe = embed(["probe"], self.encoder, max_length=self.max_length, device_setting="cpu")
            if vectors.shape[1] != probe.shape[1]:
                # the KB was embedded by an encoder we cannot run here (e.g. the demo's 768-d export):
                # re-embed its text with the configured encoder so questions and chunks share one space
                print(f"  retrieval: re-embedding {expert} ({len(kb)} chunks, {vectors.shape[1]}-d export) "
                      f"with {self.encoder}", file=sys.stderr)
                vectors = embed(kb["text"].tolist(), self.encoder, max_length=self.max_length, device_setting="cpu")
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-9)
            chunks.append(vectors)
            owner += [i] * len(vectors)
        self.chunks = torch.from_numpy(np.concatenate(chunks))
        self.owner = torch.tensor(owner)
        self.n_experts = len(labels)

    @torch.inference_mode()
    def predict(self, texts):
        q = torch.from_numpy(embed(texts, self.encoder, batch_size=len(texts), max_length=64, device_setting="cpu"))
        scores = q @ self.chunks.T  # (n, chunks)
        per_expert = torch.full((len(texts), self.n_experts), -1.0)
        for e in range(self.n_experts):
            s = scores[:, self.owner == e]
            k = min(self.top_k, s.shape[1])
            per_expert[:, e] = s.topk(k, dim=1).values.mean(1)
        return per_expert.argmax(1).numpy(), None


def latency_ms(method: Method, texts: list[str], repeats: int = 1) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        for t in texts:
            start = time.perf_counter()
            method.predict([t])
            times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.99 * len(times)))]


def throughput(method: Method, texts: list[str], batch: int = 64) -> float:
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        method.predict(texts[i : i + batch])
    return len(texts) / (time.perf_counter() - start)


def accuracy(method: Method, texts: list[str], gold: np.ndarray) -> tuple[float, float | None]:
    preds, layers = [], []
    for i in range(0, len(texts), 64):
        p, l = method.predict(texts[i : i + 64])
        preds.append(p)
        if l is not None:
            layers.append(l)
    acc = float((np.concatenate(preds) == gold).mean())
    return acc, (float(np.concatenate(layers).mean()) if layers else None)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--real-questions", help="CSV with question,expert columns (e.g. mmlu_openstax_dev.csv)")
    ap.add_argument("--latency-queries", type=int, default=200, help="test questions timed one at a time")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    config = load(args.config)
    layout = Layout.from_config(config)
    labels = read_json(layout.labels)["labels"]
    train, test = pd.read_parquet(layout.split("train")), pd.read_parquet(layout.split("test"))
    test_texts, test_gold = test["query"].tolist(), test["label"].to_numpy()
    real = None
    if args.real_questions:
        real = pd.read_csv(args.real_questions)
        unknown = sorted(set(real["expert"]) - set(labels))
        if unknown:
            sys.exit(f"{args.real_questions}: experts not in this router's labels: {unknown}")
        real_texts = real["question"].tolist()
        real_gold = real["expert"].map({e: i for i, e in enumerate(labels)}).to_numpy()

    max_length = config["dataset"]["max_length"]
    methods = [
        RouterMethod(layout.router, early_exit=True),
        RouterMethod(layout.router, early_exit=False),
        BackboneMethod(layout.backbone, max_length),
        TfidfMethod(train, config["seed"]),
        RetrievalMethod(layout, labels, config),
    ]
    timed = test_texts[: args.latency_queries]
    for m in methods:  # warm-up: first calls pay for allocation and lazy init
        m.predict(timed[:8])

    rows = []
    for m in methods:
        p50, p99 = latency_ms(m, timed)
        tput = throughput(m, test_texts)
        acc, layers = accuracy(m, test_texts, test_gold)
        row = {"method": m.name, "p50 ms (b=1)": p50, "p99 ms (b=1)": p99, "q/s (b=64)": tput,
               "test acc": acc, "mean layers": layers}
        if real is not None:
            row["real acc"], row["real layers"] = accuracy(m, real_texts, real_gold)
        rows.append(row)
        print(f"  measured {m.name}", file=sys.stderr)

    table = pd.DataFrame(rows)
    full = table.loc[table.method == "router (full depth)", "p50 ms (b=1)"].item()
    table["p50 vs full depth"] = table["p50 ms (b=1)"] / full
    print(f"\nconfig: {args.config}  test rows: {len(test)}  timed at batch 1: {len(timed)}  "
          f"threads: {args.threads}  torch {torch.__version__}")
    if real is not None:
        print(f"real questions: {args.real_questions} ({len(real)})")
    print(table.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
