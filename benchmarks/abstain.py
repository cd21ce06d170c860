"""Off-topic detection: which score should a router abstain on, and what does its calibrated threshold do?

    python benchmarks/abstain.py --router results/router --dataset results/dataset \\
        --in-domain ../shared/data/questions/dsci_seed_dev.csv \\
        --off-topic ../shared/data/questions/mmlu_openstax_dev.csv --off-topic data/off_topic/questions.csv \\
        --out benchmarks/results/abstain_demo.md

For every candidate score it prints the AUROC separating the in-domain questions (positive) from each
off-topic set and from all of them, and, at the threshold chosen on the validation split's questions
(``dataset/val.parquet``) for ``--rate`` (the share of them allowed to abstain, as train_router does),
the share of in-domain and off-topic questions abstained on. The scores:

  probability, exit layer       top probability of the early exit's answer (free)
  probability, last layer       top probability of a_N (needs all layers)
  prototype cosine, exit/last   the best expert's mean top-k prototype cosine, the DACT unit's own logit
                                / scale (prototype routers only; free at the exit layer)
  kb_similarity (last layer)    the shipped score: the best expert's mean cosine to its 10 nearest KB
                                windows (train split), in the router's own last-layer space
  KB chunks, encoder.model      the same over the whole KB's chunks (dataset/kb_index.safetensors), with
                                a second, full encoder pass over the question (needs --config)

A router saved with an abstain block uses its own kb_index and threshold; an older one gets both
computed here the way train_router computes them (KB windows of dataset/train.parquet, val questions).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from moegate.abstain import abstain_rate, auroc, kb_index_from_states, kb_similarity, threshold_for_rate
from moegate.models.dact import exit_from_output
from moegate.router import Router

BATCH = 64
TOP_K = 10


def all_states(router: Router, texts: list[str]) -> torch.Tensor:
    """(N, n, H) pooled states of every layer, in input order."""
    ids, mask = router.tokenize(texts)
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), BATCH):
            out.append(router.model.states(ids[start:start + BATCH], mask[start:start + BATCH]).float())
    return torch.cat(out, 1)


def prototype_cosines(router: Router, states: torch.Tensor) -> torch.Tensor:
    """(N, n): at each layer the best expert's mean top-k prototype cosine (the unit's logit / scale)."""
    model = router.model
    rows = []
    with torch.no_grad():
        for n in range(model.num_layers):
            u = F.normalize(model.projection(states[n] - model.center[n]), dim=-1)
            head = model.classifiers[n]
            cos = u @ F.normalize(head.prototypes, dim=-1).T
            top = cos.view(-1, head.num_experts, head.per_expert).topk(head.top_k, dim=-1).values.mean(-1)
            rows.append(top.max(1).values)
    return torch.stack(rows)


def scores(router: Router, texts: list[str], kb, chunks=None) -> dict[str, np.ndarray]:
    states = all_states(router, texts)
    with torch.no_grad():
        out = router.model.forward_states(states)
    probs, layer = exit_from_output(out)
    rows = torch.arange(len(texts))
    result = {"probability, exit layer": probs.max(1).values.numpy(),
              "probability, last layer": out.a[-1].max(1).values.numpy()}
    if router.model.center is not None:
        cos = prototype_cosines(router, states)
        result["prototype cosine, exit layer"] = cos[layer - 1, rows].numpy()
        result["prototype cosine, last layer"] = cos[-1].numpy()
    result["kb_similarity, last layer (shipped)"] = kb_similarity(kb, states[-1], TOP_K)
    if chunks is not None:
        from moegate.retrieval import embed_queries

        index, config = chunks
        result["KB chunks, encoder.model pass"] = index.expert_scores(embed_queries(texts, config), TOP_K).max(1) \
            .values.numpy()
    result["_exit_layer"] = layer.numpy()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, required=True, help="the run's dataset/ (val questions, KB windows)")
    parser.add_argument("--in-domain", type=Path, required=True, help="CSV with a question column")
    parser.add_argument("--off-topic", type=Path, action="append", required=True, help="CSV(s) with a question column")
    parser.add_argument("--rate", type=float, default=0.02, help="share of val questions allowed to abstain")
    parser.add_argument("--config", type=Path, help="the run's config: adds KB chunks scored with encoder.model")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    router = Router.from_pretrained(args.router, device="cpu")
    train = pd.read_parquet(args.dataset / "train.parquet", columns=["query", "label", "kind"])
    val = pd.read_parquet(args.dataset / "val.parquet", columns=["query", "kind"])
    val_questions = val.loc[val["kind"] == "question", "query"].astype(str).tolist()
    if router.kb_index is not None:
        kb, kb_source = router.kb_index, "the router's kb_index"
    else:  # an older router: the KB windows' last-layer states, as train_router now saves them
        windows = train[train["kind"] == "window"]
        kb = kb_index_from_states(all_states(router, windows["query"].astype(str).tolist())[-1],
                                  torch.tensor(windows["label"].to_numpy()), router.labels,
                                  [str(i) for i in windows.index])
        kb_source = f"{len(windows)} train KB windows (computed here)"
    chunks = None
    if args.config is not None:
        from moegate.config import load as load_config
        from moegate.retrieval import KBIndex

        chunks = (KBIndex.load(args.dataset / "kb_index.safetensors"), load_config(args.config))

    inside = pd.read_csv(args.in_domain)["question"].astype(str).tolist()
    sets = {"val": scores(router, val_questions, kb, chunks), "in": scores(router, inside, kb, chunks)}
    off_names = []
    for path in args.off_topic:
        sets[path.name] = scores(router, pd.read_csv(path)["question"].astype(str).tolist(), kb, chunks)
        off_names.append(path.name)
    names = [k for k in sets["in"] if not k.startswith("_")]

    lines = [f"Router `{args.router}` ({len(router.labels)} experts; mean exit layer on the in-domain questions "
             f"{sets['in']['_exit_layer'].mean():.2f} of {router.num_layers}); in-domain: `{args.in_domain}` "
             f"({len(inside)}); off-topic: " + ", ".join(f"`{p}` ({len(sets[p.name]['_exit_layer'])})"
                                                        for p in args.off_topic)
             + f"; threshold: {args.rate:.0%} of {len(val_questions)} validation questions; "
             f"kb_similarity over {kb_source}. Load: `{load}`.", ""]
    header = (["score", *[f"AUROC {n}" for n in off_names], "AUROC all off-topic", "threshold",
               "in-domain abstained", *[f"{n} abstained" for n in off_names]])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        off_all = np.concatenate([sets[n][name] for n in off_names])
        t = threshold_for_rate(sets["val"][name], args.rate)
        row = [name, *[f"{auroc(sets['in'][name], sets[n][name]):.3f}" for n in off_names],
               f"{auroc(sets['in'][name], off_all):.3f}", f"{t:.4f}", f"{abstain_rate(sets['in'][name], t):.3f}",
               *[f"{abstain_rate(sets[n][name], t):.3f}" for n in off_names]]
        lines.append("| " + " | ".join(row) + " |")
    shipped = "kb_similarity, last layer (shipped)"
    lines += ["", f"The shipped score at other validation rates (and the router's saved threshold, "
                  f"{router.abstain_below if router.abstain_score == 'kb_similarity' else 'none'}):", "",
              "| val rate | threshold | val abstained | in-domain abstained | "
              + " | ".join(f"{n} abstained" for n in off_names) + " |",
              "|" + "---|" * (4 + len(off_names))]
    for rate in sorted({args.rate, 0.02, 0.05, 0.10, 0.20}):
        t = threshold_for_rate(sets["val"][shipped], rate)
        lines.append(f"| {rate:.2f} | {t:.4f} | {abstain_rate(sets['val'][shipped], t):.3f} | "
                     f"{abstain_rate(sets['in'][shipped], t):.3f} | "
                     + " | ".join(f"{abstain_rate(sets[n][shipped], t):.3f}" for n in off_names) + " |")
    lines += ["", f"({time.perf_counter() - t0:.0f} s)"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
