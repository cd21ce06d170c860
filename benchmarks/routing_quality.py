"""Which router recipe routes real questions best: one row per recipe, trained and scored in one run.

    python benchmarks/routing_quality.py --config config.yaml \
        --real-questions ../shared/data/questions/dsci_seed_dev.csv --out benchmarks/results/routing_quality_demo.md
    python benchmarks/routing_quality.py ... --recipes frozen,frozen_prototypes,+kb_windows,+teacher
    python benchmarks/routing_quality.py ... --recipes lpft --set router.epochs=1 --set router.probe.epochs=2

Reads a results dir (the config's ``results``) whose KB stages already ran (kb/, clusters/, queries/).
A recipe is a name, dotted config overrides and the dataset variant it trains on. Each variant is its
own results dir ``<results>/bench/<variant>/`` with kb/, clusters/ and queries/ linked to the main
run's, where the dataset stage (and, for frozen/lpft, the states stage; for finetune, train_backbone)
runs once and is reused on a rerun while its dataset settings are unchanged. When the main results dir
was built with a variant's dataset settings and already holds what a recipe needs, it is used as is.

  variant               dataset.kb_windows  dataset.teacher  queries
  questions             off                 off              the main run's
  windows               on                  off              the main run's
  windows_teacher       on                  on               the main run's
  llm_windows_teacher   on                  on               --llm-results DIR/queries (e.g. an LLM's)

  recipe             encoder   classifier  variant              teacher_weight
  finetune           finetune  mlp         questions            0   (today's recipe; trains backbone/ first)
  frozen             frozen    mlp         questions            0
  frozen_prototypes  frozen    prototypes  questions            0
  +kb_windows        frozen    prototypes  windows              0
  +teacher           frozen    prototypes  windows_teacher      1
  +kb_last_layer     frozen    prototypes  windows_teacher      1   (router.head.last_layer: kb, kb_scale learned)
  +kb_scale          frozen    prototypes  windows_teacher      1   (last_layer: kb, kb_scale: 100, fixed)
  lpft               lpft      prototypes  windows_teacher      1
  llm_questions      frozen    prototypes  llm_windows_teacher  1   (only with --llm-results)

λ: frozen recipes sweep ``--ponder-cost-grid`` (default router.ponder_cost_grid) with
:func:`moegate.stages.train_router.sweep_lambda` (the λ study's rule on val), then fit once at the chosen λ
into ``<results>/bench/routers/<recipe>/``. finetune and lpft train on tokens (slow on a CPU), so they
use the config's ``router.ponder_cost`` unless ``--sweep-all``. Tuned values (``tuning/*.json``) are not
overlaid: every recipe runs the config's settings plus its own overrides plus ``--set``.

Scored beside two baselines that need no router: retrieval routing over the KB index (the
``questions`` variant's ``dataset/kb_index.safetensors``, ``evaluate.retrieval_top_k``) and word 1-2-gram
TF-IDF + logistic regression fitted on the ``questions`` variant's train split. Columns: accuracy and
macro-F1 (over every expert) on the real questions; accuracy on the variant's synthetic test split (all
rows); the mean exit layer on the real questions; whether early exit and full depth pick the same expert
on every real and test question (must be 1.0 by the exit rule); batch-1 p50 latency over the first
``--latency-questions`` real questions, one per call, tokenization included, and its ratio to retrieval
routing's p50 measured right before it; the exact McNemar p-value against retrieval routing on the real
questions (b/c = questions only this method / only retrieval got right); the chosen λ; training wall
seconds (λ sweep + final fit; + the backbone for finetune when it was trained in this run).

Training happens first, all timing afterwards, so the latencies are measured back to back. Timings are
wall-clock on whatever else the machine is doing.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from router_speed import Method, RouterMethod, TfidfMethod, latency_ms

from moegate.config import load, validate
from moegate.io import read_json, write_json
from moegate.layout import Layout
from moegate.stages.evaluate import mcnemar_exact, read_real_questions

log = logging.getLogger("routing_quality")

LINKED = ("kb", "clusters", "queries")  # the KB stages' outputs every variant shares
FINGERPRINT_FILE = "bench_variant.json"
BENCH_FILE = "bench.json"


# -- recipes and dataset variants -----------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    name: str
    kb_windows: bool
    teacher: bool
    llm_queries: bool = False  # queries/ from --llm-results instead of the main run

    def overrides(self) -> dict:
        return {"dataset.kb_windows.enabled": self.kb_windows, "dataset.teacher.enabled": self.teacher}


VARIANTS = {v.name: v for v in (
    Variant("questions", kb_windows=False, teacher=False),
    Variant("windows", kb_windows=True, teacher=False),
    Variant("windows_teacher", kb_windows=True, teacher=True),
    Variant("llm_windows_teacher", kb_windows=True, teacher=True, llm_queries=True),
)}


@dataclass(frozen=True)
class Recipe:
    name: str
    variant: str
    overrides: dict = field(default_factory=dict)  # dotted config keys
    needs_llm: bool = False

    @property
    def mode(self) -> str:
        return self.overrides["router.encoder_mode"]

    @property
    def token_training(self) -> bool:
        """finetune and lpft train the encoder on tokens: minutes an epoch on a CPU, so no λ sweep by default."""
        return self.mode in ("finetune", "lpft")


def _router(mode: str, classifier: str, teacher_weight: float, last_layer: str = "trained",
            kb_scale: float | None = None) -> dict:
    return {"router.encoder_mode": mode, "router.head.classifier": classifier,
            "router.teacher_weight": float(teacher_weight), "router.head.last_layer": last_layer,
            "router.head.kb_scale": kb_scale, "router.label_weight": 1.0}


RECIPES = [
    Recipe("finetune", "questions", _router("finetune", "mlp", 0)),
    Recipe("frozen", "questions", _router("frozen", "mlp", 0)),
    Recipe("frozen_prototypes", "questions", _router("frozen", "prototypes", 0)),
    Recipe("+kb_windows", "windows", _router("frozen", "prototypes", 0)),
    Recipe("+teacher", "windows_teacher", _router("frozen", "prototypes", 1)),
    Recipe("+kb_last_layer", "windows_teacher", _router("frozen", "prototypes", 1, "kb")),
    Recipe("+kb_scale", "windows_teacher", _router("frozen", "prototypes", 1, "kb", 100.0)),
    Recipe("lpft", "windows_teacher", _router("lpft", "prototypes", 1)),
    Recipe("llm_questions", "llm_windows_teacher", _router("frozen", "prototypes", 1), needs_llm=True),
]


def select_recipes(names: str | None, llm: bool) -> list[Recipe]:
    by_name = {r.name: r for r in RECIPES}
    if not names:
        return [r for r in RECIPES if llm or not r.needs_llm]
    chosen = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in by_name:
            sys.exit(f"--recipes: unknown recipe {name!r}; expected some of {list(by_name)}")
        if by_name[name].needs_llm and not llm:
            sys.exit(f"--recipes: {name} needs --llm-results DIR")
        chosen.append(by_name[name])
    return chosen


# -- preparing a variant's results dir ------------------------------------------------------------
def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def dataset_fingerprint(cfg: dict, queries: Path) -> dict:
    """What a dataset (and its states) depends on: if this is equal, the files can be reused."""
    return {"experts": cfg["experts"], "seed": cfg["seed"], "dataset": cfg["dataset"],
            "backbone_model": cfg["backbone"]["model"], "encoder": cfg["encoder"],
            "pooling": cfg["router"]["head"]["pooling"], "queries": str(queries.resolve())}


def has_states(layout: Layout, cfg: dict) -> bool:
    report = layout.states / "report.json"
    if not report.is_file():
        return False
    r = read_json(report)
    return r.get("encoder") == cfg["backbone"]["model"] and r.get("pooling") == cfg["router"]["head"]["pooling"]


def has_backbone(layout: Layout, cfg: dict) -> bool:
    """backbone/ is there and was trained with this config's backbone settings (a --set backbone.epochs=1
    smoke test must not stand in for the real one)."""
    metrics = layout.backbone / "metrics.json"
    if not ((layout.backbone / "model.safetensors").is_file() and metrics.is_file()):
        return False
    params = read_json(metrics).get("params", {})
    return params.get("seed") == cfg["seed"] and all(params.get(k) == v for k, v in cfg["backbone"].items())


def main_dir_matches(main: Layout, cfg: dict, needs: set[str]) -> bool:
    """The main results dir was built with this variant's dataset settings and holds all it needs."""
    if not (main.resolved_config.is_file() and main.dataset_report.is_file()):
        return False
    try:
        resolved = validate(yaml.safe_load(main.resolved_config.read_text()), source=str(main.resolved_config))
    except ValueError as e:  # written under another schema: cannot tell, so build the variant
        progress(f"{main.resolved_config}: not comparable ({str(e).splitlines()[-1].strip()})")
        return False
    if dataset_fingerprint(resolved, main.results / "queries") != dataset_fingerprint(cfg, main.results / "queries"):
        return False
    return ("states" not in needs or has_states(main, cfg)) and ("backbone" not in needs or has_backbone(main, cfg))


def link_inputs(target: Path, sources: dict[str, Path]) -> None:
    """kb/, clusters/, queries/ of ``target`` as symlinks to ``sources`` (replacing stale links)."""
    target.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        if not src.is_dir():
            sys.exit(f"{src}: missing (the KB stages must have run: kb/, clusters/, queries/)")
        link = target / name
        if link.is_symlink() and link.resolve() == src.resolve():
            continue
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.exists():
            shutil.rmtree(link)
        link.symlink_to(src.resolve(), target_is_directory=True)


@dataclass
class Prepared:
    """A variant ready to train on: its results dir, its (dataset-level) config and what it cost."""

    variant: Variant
    results: Path
    config: dict
    reused_main: bool = False
    backbone_s: float = 0.0  # train_backbone wall seconds, when it ran in this invocation


def variant_config(args, variant: Variant, results: Path, extra: dict | None = None) -> dict:
    overrides = {**args.set, "results": str(results), **variant.overrides(), **(extra or {})}
    return load(args.config, overrides=overrides)


def prepare_variant(args, main: Layout, variant: Variant, needs: set[str]) -> Prepared:
    """The variant's dataset (and states / backbone when a recipe needs them), built once, reused after."""
    queries = Path(args.llm_results) / "queries" if variant.llm_queries else main.results / "queries"
    cfg = variant_config(args, variant, main.results)
    if not variant.llm_queries and main_dir_matches(main, cfg, needs):
        progress(f"variant {variant.name}: the main results dir {main.results} matches; using it as is")
        return Prepared(variant, main.results, cfg, reused_main=True)

    results = main.results / "bench" / variant.name
    cfg = variant_config(args, variant, results)
    layout = Layout.from_config(cfg)
    link_inputs(results, {"kb": main.results / "kb", "clusters": main.results / "clusters", "queries": queries})
    fingerprint = dataset_fingerprint(cfg, queries)
    stamp = results / FINGERPRINT_FILE
    if layout.dataset_report.is_file() and stamp.is_file() and read_json(stamp) == json.loads(json.dumps(fingerprint)):
        progress(f"variant {variant.name}: reusing {layout.dataset}")
    else:
        from moegate.stages.dataset import dataset

        for stale in (layout.dataset, layout.states, layout.backbone):  # ours: built from the old dataset
            shutil.rmtree(stale, ignore_errors=True)
        progress(f"variant {variant.name}: dataset stage into {layout.dataset}")
        t0 = time.perf_counter()
        dataset(cfg)
        write_json(stamp, fingerprint)
        progress(f"variant {variant.name}: dataset in {time.perf_counter() - t0:.0f} s")
    prepared = Prepared(variant, results, cfg)
    if "states" in needs:
        if has_states(layout, cfg):
            progress(f"variant {variant.name}: reusing {layout.states}")
        else:
            from moegate.stages.states import states

            progress(f"variant {variant.name}: states stage into {layout.states}")
            t0 = time.perf_counter()
            states(cfg)
            progress(f"variant {variant.name}: states in {time.perf_counter() - t0:.0f} s")
    if "backbone" in needs:
        if has_backbone(layout, cfg):
            progress(f"variant {variant.name}: reusing {layout.backbone}")
        else:
            from moegate.stages.train_backbone import train_backbone

            progress(f"variant {variant.name}: train_backbone into {layout.backbone} (slow on a CPU)")
            t0 = time.perf_counter()
            train_backbone(cfg)
            prepared.backbone_s = time.perf_counter() - t0
            progress(f"variant {variant.name}: backbone in {prepared.backbone_s:.0f} s")
    return prepared


def needs_of(recipe: Recipe) -> set[str]:
    return {"frozen": {"states"}, "lpft": {"states"}, "finetune": {"backbone"}}[recipe.mode]


# -- training a recipe's router -------------------------------------------------------------------
@dataclass
class Trained:
    recipe: Recipe
    prepared: Prepared
    router_dir: Path
    ponder_cost: float
    train_s: float
    sweep: list[dict] = field(default_factory=list)  # [{ponder_cost, val_accuracy, val_mean_layers, ...}]


def recipe_config(args, recipe: Recipe, prepared: Prepared) -> dict:
    return variant_config(args, prepared.variant, prepared.results, recipe.overrides)


def train_recipe(args, recipe: Recipe, prepared: Prepared, out_dir: Path) -> Trained:
    """λ from the sweep (frozen; every recipe with --sweep-all) or the config, then one fit into out_dir."""
    from moegate.stages.train_router import fit, sweep_lambda

    cfg = recipe_config(args, recipe, prepared)
    grid = args.ponder_cost_grid
    if grid is None:
        grid = list(cfg["router"]["ponder_cost_grid"])
    sweeps = bool(grid) and (not recipe.token_training or args.sweep_all)
    settings = copy.deepcopy(cfg["router"])  # the sweep below overwrites cfg's λ: stamp the inputs
    if sweeps:
        settings.pop("ponder_cost")  # chosen by the sweep, not an input
    stamp = {"recipe": recipe.name, "variant": prepared.variant.name, "results": str(prepared.results),
             "router": settings, "seed": cfg["seed"], "grid": grid if sweeps else None}
    bench = out_dir / BENCH_FILE
    if args.reuse_routers and bench.is_file():
        old = read_json(bench)
        if old.get("stamp") == json.loads(json.dumps(stamp)):
            progress(f"recipe {recipe.name}: reusing {out_dir} (λ={old['ponder_cost']:g})")
            return Trained(recipe, prepared, out_dir, old["ponder_cost"], old["train_s"], old["sweep"])

    t0 = time.perf_counter()
    sweep = None
    if sweeps:
        progress(f"recipe {recipe.name}: λ sweep over {grid}")
        trial = copy.deepcopy(cfg)
        trial["router"]["ponder_cost_grid"] = list(grid)
        sweep = sweep_lambda(trial)
        cfg["router"]["ponder_cost"] = float(sweep["chosen"]["ponder_cost"])
    ponder_cost = float(cfg["router"]["ponder_cost"])
    progress(f"recipe {recipe.name}: fit at λ={ponder_cost:g} into {out_dir}")
    fit(cfg, out_dir=out_dir, extra={"lambda_sweep": sweep} if sweep else None)
    train_s = time.perf_counter() - t0 + (prepared.backbone_s if recipe.mode == "finetune" else 0.0)
    rows = [{k: r[k] for k in ("ponder_cost", "val_accuracy", "val_mean_layers")}
            for r in (sweep or {}).get("rows", [])]
    write_json(bench, {"stamp": stamp, "ponder_cost": ponder_cost, "train_s": train_s, "sweep": rows})
    progress(f"recipe {recipe.name}: trained in {train_s:.0f} s")
    return Trained(recipe, prepared, out_dir, ponder_cost, train_s, rows)


# -- scoring ----------------------------------------------------------------------------------------
class RetrievalMethod(Method):
    """moegate.retrieval.RetrievalRouter (what evaluate scores) behind the Method interface."""

    name = "retrieval routing"

    def __init__(self, index_path: Path, config: dict, labels: list[str]):
        from moegate.retrieval import KBIndex, RetrievalRouter

        index = KBIndex.load(index_path)
        if index.labels != labels:
            sys.exit(f"{index_path}: labels {index.labels} differ from {labels}")
        self.router = RetrievalRouter(index, config, top_k=config["evaluate"]["retrieval_top_k"])

    def predict(self, texts):
        return self.router.predict(texts), None


def predict_all(method: Method, texts: list[str], batch: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
    preds, layers = [], []
    for i in range(0, len(texts), batch):
        p, l = method.predict(texts[i : i + batch])
        preds.append(np.asarray(p))
        if l is not None:
            layers.append(np.asarray(l))
    return np.concatenate(preds), (np.concatenate(layers) if layers else None)


def macro_f1(truth: np.ndarray, pred: np.ndarray, k: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(truth, pred, labels=list(range(k)), average="macro", zero_division=0))


def p50_ms(method: Method, texts: list[str]) -> float:
    method.predict(texts[:1])  # warm-up: allocation and lazy init are not routing
    return latency_ms(method, texts)[0]


@dataclass
class Questions:
    texts: list[str]
    truth: np.ndarray


def read_test(layout: Layout) -> Questions:
    test = pd.read_parquet(layout.split("test"), columns=["query", "label"])
    return Questions(test["query"].astype(str).tolist(), test["label"].to_numpy())


def score(method: Method, real: Questions, test: Questions, retrieval_correct: np.ndarray | None,
          labels: list[str]) -> tuple[dict, np.ndarray]:
    """The quality columns of one method; also returns its real-question predictions."""
    pred, layers = predict_all(method, real.texts)
    test_pred, _ = predict_all(method, test.texts)
    correct = pred == real.truth
    row = {"real acc": float(correct.mean()), "real macro-F1": macro_f1(real.truth, pred, len(labels)),
           "synth test acc": float((test_pred == test.truth).mean()),
           "mean exit layer": float(layers.mean()) if layers is not None else None}
    if retrieval_correct is not None:
        test_ = mcnemar_exact(correct, retrieval_correct)
        row["McNemar p vs retrieval"] = test_["p_value"]
        row["b/c"] = f"{test_['a_only']}/{test_['b_only']}"
    return row, pred


def agreement(router: RouterMethod, texts: list[str], early: np.ndarray) -> float:
    full = router.router.predict(texts, early_exit=False, batch_size=64)[0].argmax(1)
    return float((full == early).mean())


# -- the report -------------------------------------------------------------------------------------
def variant_sizes(prepared: list[Prepared]) -> list[str]:
    lines = []
    for p in prepared:
        report = read_json(Layout(p.results).dataset_report)
        splits = report["splits"]
        sizes = ", ".join(f"{s} {splits[s]['rows']}" + (f" ({splits[s]['kind'].get('window', 0)} windows)"
                                                        if splits[s]["kind"].get("window") else "")
                          for s in ("train", "val", "test"))
        where = f"{p.results}" + (" (the main results dir, as is)" if p.reused_main else "")
        lines.append(f"- `{p.variant.name}` ({where}): {sizes}")
    return lines


def markdown(table: pd.DataFrame) -> str:
    cells = table.astype(object).where(table.notna(), None)  # blank, not nan, where a column does not apply
    formats = tuple(".2g" if column.startswith("McNemar p") else ".3f" for column in table.columns)  # not 0.000
    return cells.to_markdown(index=False, floatfmt=formats, missingval="")


def render(args, prepared: list[Prepared], trained: list[Trained], table: pd.DataFrame, real_n: int,
           timed_n: int, num_layers: int | None, wall_s: float) -> str:
    head = [
        (f"# routing_quality.py ({datetime.date.today().isoformat()}, {args.machine}, "
         f"torch {torch.__version__}, {torch.get_num_threads()} threads)"),
        "",
        f"config: `{args.config}`" + (f", with `--set` {args.set}" if args.set else ""),
        f"real questions: `{args.real_questions}` ({real_n}; latency over the first {timed_n}, one per call)",
        (f"λ grid: {args.ponder_cost_grid if args.ponder_cost_grid is not None else 'router.ponder_cost_grid'}"
         + (" (every recipe)" if args.sweep_all else " (frozen recipes; finetune/lpft use router.ponder_cost)")),
        f"router layers: {num_layers}" if num_layers else "",
        f"wall time of this run: {wall_s / 60:.1f} min",
        "",
        "dataset variants (rows per split):",
        *variant_sizes(prepared),
        "",
        markdown(table),
    ]
    sweeps = [t for t in trained if t.sweep]
    if sweeps:
        head += ["", "λ sweeps (val accuracy / mean layers per λ; chosen λ in the table):", ""]
        for t in sweeps:
            head.append(f"- {t.recipe.name}: " + ", ".join(
                f"λ={r['ponder_cost']:g}: {r['val_accuracy']:.3f} / {r['val_mean_layers']:.2f}" for r in t.sweep))
    return "\n".join(line for line in head if line is not None) + "\n"


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            sys.exit(f"--set {item!r}: expected dotted.key=value")
        out[key.strip()] = yaml.safe_load(value)  # 1 -> int, 0.5 -> float, true -> bool, [a, b] -> list
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--real-questions", required=True, help="CSV with question,expert columns")
    ap.add_argument("--out", help="also write the table (with a header) to this Markdown file")
    ap.add_argument("--recipes", help=f"comma-separated, of {[r.name for r in RECIPES]} (default: all; "
                                      "llm_questions only with --llm-results)")
    ap.add_argument("--llm-results", help="a results dir whose queries/ an LLM wrote (same experts)")
    ap.add_argument("--latency-questions", type=int, default=200, help="real questions timed one at a time")
    ap.add_argument("--ponder-cost-grid", "--lambda-grid", type=lambda s: [float(x) for x in s.split(",") if x.strip()],
                    help="comma-separated λ values to sweep (default: router.ponder_cost_grid; '' = "
                         "router.ponder_cost; --lambda-grid is its old name)")
    ap.add_argument("--sweep-all", action="store_true", help="sweep λ for finetune and lpft too (slow)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted config override for every variant and recipe, e.g. router.epochs=1 (repeatable)")
    ap.add_argument("--reuse-routers", action="store_true",
                    help="skip training a recipe whose router in <results>/bench/routers/ has the same settings")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--machine", default="2-core CPU VM", help="machine note for the header")
    args = ap.parse_args(argv)
    args.set = parse_set(args.set)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="  %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    recipes = select_recipes(args.recipes, bool(args.llm_results))
    main_cfg = load(args.config, overrides=args.set)
    main = Layout.from_config(main_cfg)
    labels = list(main_cfg["experts"])
    real_texts, real_truth = read_real_questions(args.real_questions, labels)
    real = Questions(real_texts, real_truth)
    timed = real.texts[: args.latency_questions]

    # 1. dataset variants: `questions` always (the baselines' train and test split, the KB index)
    needs: dict[str, set[str]] = {"questions": set()}
    for r in recipes:
        needs.setdefault(r.variant, set()).update(needs_of(r))
    prepared = {name: prepare_variant(args, main, VARIANTS[name], needs[name]) for name in needs}

    # 2. routers, all trained before anything is timed
    trained = [train_recipe(args, r, prepared[r.variant], main.results / "bench" / "routers" / r.name)
               for r in recipes]

    # 3. scoring: baselines, then each router with retrieval routing timed right before it
    progress("scoring")
    base = prepared["questions"]
    base_layout = Layout(base.results)
    base_test = read_test(base_layout)
    retrieval = RetrievalMethod(base_layout.kb_index, base.config, labels)
    ret_row, ret_pred = score(retrieval, real, base_test, None, labels)
    ret_correct = ret_pred == real.truth
    ret_p50s = [p50_ms(retrieval, timed)]
    tfidf = TfidfMethod(pd.read_parquet(base_layout.split("train"), columns=["query", "label"]), main_cfg["seed"])
    tfidf_row, _ = score(tfidf, real, base_test, ret_correct, labels)
    tfidf_row["p50 ms (b=1)"] = p50_ms(tfidf, timed)
    tfidf_row["p50 / retrieval"] = tfidf_row["p50 ms (b=1)"] / ret_p50s[0]

    rows, agreements, num_layers = [], {}, None
    for t in trained:
        router = RouterMethod(t.router_dir, early_exit=True)
        num_layers = router.router.num_layers
        test = read_test(Layout(t.prepared.results))
        row, pred = score(router, real, test, ret_correct, labels)
        test_pred, _ = predict_all(router, test.texts)
        agree = agreement(router, real.texts + test.texts, np.concatenate([pred, test_pred]))
        agreements[t.recipe.name] = agree
        ret_p50s.append(p50_ms(retrieval, timed))
        p50 = p50_ms(router, timed)
        rows.append({"method": t.recipe.name, "variant": t.prepared.variant.name, **row,
                     "exit = full depth": agree, "p50 ms (b=1)": p50, "p50 / retrieval": p50 / ret_p50s[-1],
                     "λ": t.ponder_cost, "train s": t.train_s})
        progress(f"scored {t.recipe.name}: real acc {row['real acc']:.3f}, {row['mean exit layer']:.2f} layers, "
                 f"p50 {p50:.2f} ms")
        del router

    ret_row.update({"p50 ms (b=1)": statistics.median(ret_p50s), "p50 / retrieval": 1.0})
    rows.append({"method": "retrieval routing", "variant": "questions", **ret_row})
    rows.append({"method": "tfidf + logreg", "variant": "questions", **tfidf_row})
    columns = ["method", "variant", "real acc", "real macro-F1", "synth test acc", "mean exit layer",
               "exit = full depth", "p50 ms (b=1)", "p50 / retrieval", "McNemar p vs retrieval", "b/c", "λ",
               "train s"]
    table = pd.DataFrame(rows).reindex(columns=columns)

    text = render(args, list(prepared.values()), trained, table, len(real.texts), len(timed), num_layers,
                  time.perf_counter() - started)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        progress(f"wrote {args.out}")
    broken = {k: v for k, v in agreements.items() if v != 1.0}
    if broken:
        progress(f"ERROR: early exit and full depth disagree (must be 1.0): {broken}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
