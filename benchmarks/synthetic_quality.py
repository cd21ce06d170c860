"""Are the synthesized queries worth training on? Scored on real exam questions.

    python benchmarks/synthetic_quality.py                                   # the ten OpenStax courses
    python benchmarks/synthetic_quality.py --courses biology,economics       # a quick check on two

Runs (or reuses: Snakemake only makes what is missing) the data stages of
``workflow/configs/openstax.yaml`` up to the dataset, then compares two routers that need no GPU:

  tfidf + logreg (synthetic)   word 1-2-gram TF-IDF (sublinear tf) + logistic regression trained on
                               the synthesized TRAIN split; C picked on the synthesized val split
  tfidf centroid (book text)   no training at all: TF-IDF over the books' own chunk text
                               (kb/{expert}.parquet), one centroid per book, nearest centroid wins

on the real questions of ``../shared/data/questions/mmlu_openstax_dev.csv`` (462 MMLU dev/val
questions labelled with their OpenStax course) and on the synthesized test split. Prints a Markdown
table (accuracy, macro-F1, per-expert accuracy) and writes it as JSON under
``{results}/benchmarks/synthetic_quality.json``.

With ``--courses`` the run gets its own results dir (``{results}-{course}-{course}``) and only the real
questions of those courses are scored. The full run ingests ~40k chunks: tens of minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from moegate.config import validate
from moegate.io import read_json, write_json, write_text
from moegate.layout import Layout
from moegate.stages.dataset import normalise

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "workflow" / "configs" / "openstax.yaml"
DEFAULT_QUESTIONS = REPO.parent / "shared" / "data" / "questions" / "mmlu_openstax_dev.csv"
C_GRID = (0.5, 2.0, 8.0)  # inverse regularisation strengths tried on the synthetic val split

log = logging.getLogger("synthetic_quality")


# -- the workflow -------------------------------------------------------------------------------
def run_config(config_path: Path, courses: list[str] | None, results: str | None) -> dict:
    """The benchmark's run config: ``config_path`` limited to ``courses``, with its own results dir."""
    config = yaml.safe_load(config_path.read_text())
    if courses:
        unknown = [c for c in courses if c not in config["experts"]]
        if unknown:
            sys.exit(f"{config_path}: no expert(s) {unknown}; experts are {list(config['experts'])}")
        config["experts"] = {c: config["experts"][c] for c in courses}
        config["results"] = f"{config.get('results', 'results')}-{'-'.join(courses)}"
    if results:
        config["results"] = results
    return validate(copy.deepcopy(config), source=str(config_path))


def run_workflow(config: dict, cores: int) -> None:
    """Snakemake up to the dataset (reuses whatever is already there), in the repository root."""
    layout = Layout.from_config(config)
    config_file = layout.results / "synthetic_quality.config.yaml"
    write_text(config_file, yaml.safe_dump(config, sort_keys=False))
    targets = [str(layout.dataset_report)] + [str(layout.kb(e)) for e in config["experts"]]
    snakemake = Path(sys.executable).parent / "snakemake"
    cmd = [
        str(snakemake if snakemake.exists() else "snakemake"),
        *targets,
        "--cores",
        str(cores),
        "--configfile",
        str(config_file),
        "--replace-workflow-config",
    ]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log.info("running: %s", " ".join(cmd))
    started = time.perf_counter()
    done = subprocess.run(cmd, check=False, cwd=REPO, env=env)
    if done.returncode != 0:
        sys.exit(f"snakemake failed (exit {done.returncode}); logs under {layout.logs}")
    log.info("data stages ready in %.0f s", time.perf_counter() - started)


# -- the two routers ----------------------------------------------------------------------------
def vectorizer():
    from sklearn.feature_extraction.text import TfidfVectorizer

    # min_df=2 halves the bigram vocabulary at no cost in accuracy (measured on the book text)
    return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)


def train_logreg(train: pd.DataFrame, val: pd.DataFrame, C: float | None):
    """TF-IDF + logistic regression on the synthetic train split; returns (predict, chosen C, val acc)."""
    from sklearn.linear_model import LogisticRegression

    vec = vectorizer()
    x_train = vec.fit_transform(train["query"])
    x_val = vec.transform(val["query"])
    best = None
    for c in [C] if C else C_GRID:
        model = LogisticRegression(C=c, max_iter=2000).fit(x_train, train["label"])
        acc = float((model.predict(x_val) == val["label"].to_numpy()).mean())
        log.info("logreg C=%g: synthetic val accuracy %.3f", c, acc)
        if best is None or acc > best[2]:
            best = (model, c, acc)
    model, c, acc = best
    return (lambda texts: model.predict(vec.transform(texts))), c, acc


def book_centroids(kb_texts: list[list[str]]):
    """Nearest TF-IDF centroid of each expert's chunk texts; returns predict(texts) -> label index."""
    from sklearn.preprocessing import normalize

    vec = vectorizer()
    x = vec.fit_transform([t for texts in kb_texts for t in texts])
    bounds = np.cumsum([0] + [len(t) for t in kb_texts])
    centroids = normalize(np.vstack([np.asarray(x[a:b].mean(axis=0)) for a, b in itertools.pairwise(bounds)]))
    return lambda texts: np.asarray((vec.transform(texts) @ centroids.T).argmax(axis=1)).ravel()


# -- scoring ------------------------------------------------------------------------------------
def scores(pred: np.ndarray, truth: np.ndarray, labels: list[str]) -> dict:
    from sklearn.metrics import f1_score

    per_expert = {}
    for i, name in enumerate(labels):
        mask = truth == i
        per_expert[name] = {
            "n": int(mask.sum()),
            "accuracy": float((pred[mask] == i).mean()) if mask.any() else None,
        }
    return {
        "n": len(truth),
        "accuracy": float((pred == truth).mean()),
        "macro_f1": float(
            f1_score(truth, pred, labels=list(range(len(labels))), average="macro", zero_division=0)
        ),
        "per_expert": per_expert,
    }


def real_questions(path: Path, labels: list[str]) -> tuple[list[str], np.ndarray, int]:
    """(normalised questions, label indices, rows left out because their course is not an expert)."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"question", "expert"} - set(frame.columns)
    if missing:
        sys.exit(f"{path}: missing column(s) {sorted(missing)}")
    keep = frame["expert"].isin(labels)
    frame = frame[keep]
    return (
        [normalise(q) for q in frame["question"]],
        frame["expert"].map(labels.index).to_numpy(),
        int((~keep).sum()),
    )


def table(results: dict, labels: list[str]) -> str:
    cols = list(results["methods"])

    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}"

    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]

    def row(name, get):
        lines.append(f"| {name} | " + " | ".join(pct(get(results["methods"][c])) for c in cols) + " |")

    n_real, n_test = results["real_questions"], results["synthetic_test_rows"]
    row(f"accuracy, real questions (n={n_real})", lambda m: m["real"]["accuracy"])
    row("macro-F1, real questions", lambda m: m["real"]["macro_f1"])
    row(f"accuracy, synthetic test split (n={n_test})", lambda m: m["synthetic_test"]["accuracy"])
    for name in labels:
        n = results["methods"][cols[0]]["real"]["per_expert"][name]["n"]
        row(f"real accuracy: {name} (n={n})", lambda m, e=name: m["real"]["per_expert"][e]["accuracy"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="run config with the book experts"
    )
    parser.add_argument("--courses", help="comma-separated subset of the config's experts (a quick check)")
    parser.add_argument("--results", help="results dir (default: the config's, suffixed with the courses)")
    parser.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS, help="CSV with question,expert")
    parser.add_argument("--cores", type=int, default=2, help="snakemake --cores")
    parser.add_argument("--no-run", action="store_true", help="score existing outputs, do not call snakemake")
    parser.add_argument(
        "--C", type=float, help="logistic regression C (default: best on the synthetic val split)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    courses = [c.strip() for c in args.courses.split(",") if c.strip()] if args.courses else None
    config = run_config(args.config, courses, args.results)
    layout = Layout.from_config(config)
    if not args.no_run:
        run_workflow(config, args.cores)

    labels = read_json(layout.labels)["labels"]
    splits = {s: pd.read_parquet(layout.split(s)) for s in ("train", "val", "test")}
    questions, truth, left_out = real_questions(args.questions, labels)
    started = time.perf_counter()
    logreg, chosen_c, val_acc = train_logreg(splits["train"], splits["val"], args.C)
    log.info(
        "logreg trained on %d synthetic queries in %.0f s",
        len(splits["train"]),
        time.perf_counter() - started,
    )
    centroid = book_centroids(
        [pd.read_parquet(layout.kb(e), columns=["text"])["text"].tolist() for e in labels]
    )

    test_truth = splits["test"]["label"].to_numpy()
    methods = {"tfidf + logreg (synthetic)": logreg, "tfidf centroid (book text)": centroid}
    results = {
        "config": str(args.config),
        "results": str(layout.results),
        "labels": labels,
        "real_questions": len(questions),
        "real_questions_left_out": left_out,
        "synthetic_rows": {s: len(f) for s, f in splits.items()},
        "synthetic_test_rows": len(test_truth),
        "logreg_C": chosen_c,
        "logreg_val_accuracy": val_acc,
        "methods": {
            name: {
                "real": scores(np.asarray(predict(questions)), truth, labels),
                "synthetic_test": scores(
                    np.asarray(predict(splits["test"]["query"].tolist())), test_truth, labels
                ),
            }
            for name, predict in methods.items()
        },
    }
    write_json(layout.results / "benchmarks" / "synthetic_quality.json", results)
    print(
        f"\nRouting {len(labels)} experts; trained on {len(splits['train'])} synthetic queries "
        f"(logreg C={chosen_c:g}); real questions: {args.questions.name}\n"
    )
    print(table(results, labels))
    return results


if __name__ == "__main__":
    main()
