"""How λ and the per-layer exit loss trade accuracy for layers, on a finished run's data.

    python benchmarks/lambda_sweep.py --config results/config.resolved.yaml \
        --lambdas 0.1 0.15 0.2 0.3 --layer-loss 0 1 --seeds 0 1

For every (λ, layer_loss_weight, seed) it trains the DACT router from the run's fine-tuned backbone
with the run's router settings (tuned values overlaid, as train_router does), then scores it on the
test split with the real per-sample early exit. Prints one table: test accuracy (early exit; full
depth is the same by the exit rule), mean exit layer, the exit-layer histogram, the accuracy of each
layer's own classifier, and the backbone classifier's test accuracy for reference. Nothing in the run
directory is changed (routers are written to a temporary folder).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from moegate.config import load
from moegate.io import read_json
from moegate.layout import Layout
from moegate.router import Router
from moegate.stages.evaluate import layer_accuracies
from moegate.stages.train_router import TUNED_STUDIES, fit
from moegate.training import load_tokens
from moegate.tuned import apply_tuned


def run_one(config: dict, ponder_cost: float, layer_loss: float, seed: int, test, workdir: Path) -> dict:
    cfg = copy.deepcopy(config)
    cfg["router"]["ponder_cost"] = ponder_cost
    cfg["router"]["layer_loss_weight"] = layer_loss
    cfg["seed"] = seed
    out = workdir / f"router-{ponder_cost}-{layer_loss}-{seed}"
    t0 = time.perf_counter()
    summary = fit(cfg, out_dir=out)
    seconds = time.perf_counter() - t0
    router = Router.from_pretrained(out, device="cpu")
    probs, exit_layer = router.predict_tokens(test.input_ids, test.attention_mask, early_exit=True)
    truth = test.labels.numpy()
    hist = np.bincount(exit_layer - 1, minlength=router.num_layers)
    return {
        "λ": ponder_cost, "layer loss β": layer_loss, "seed": seed, "epochs": summary["epochs"],
        "test acc": float((probs.argmax(1) == truth).mean()),
        "mean layers": float(exit_layer.mean()),
        "exit histogram (1..N)": "/".join(str(int(h)) for h in hist),
        "layer-n classifier acc": "/".join(f"{a:.2f}" for a in layer_accuracies(router.model, test, 64, router.device)),
        "train s": seconds,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="results/config.resolved.yaml")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 0.15, 0.2, 0.3])
    ap.add_argument("--layer-loss", type=float, nargs="+", default=[1.0], help="router.layer_loss_weight values")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    config, _ = apply_tuned(load(args.config), TUNED_STUDIES)
    layout = Layout.from_config(config)
    for need in (layout.tokens("test"), layout.backbone / "model.safetensors"):
        if not need.exists():
            sys.exit(f"{need}: missing; run the workflow through train_backbone first")
    test = load_tokens(layout.tokens("test"))
    backbone = read_json(layout.backbone / "metrics.json").get("test", {})
    rows = []
    with tempfile.TemporaryDirectory(prefix="lambda_sweep-") as tmp:
        for layer_loss in args.layer_loss:
            for ponder_cost in args.lambdas:
                for seed in args.seeds:
                    rows.append(run_one(config, ponder_cost, layer_loss, seed, test, Path(tmp)))
                    print(f"  λ={ponder_cost} β={layer_loss} seed={seed}: acc {rows[-1]['test acc']:.3f}, "
                          f"{rows[-1]['mean layers']:.2f} layers", file=sys.stderr)
    print(f"\nconfig: {args.config}  test rows: {len(test)}  router epochs (max): {config['router']['epochs']}  "
          f"threads: {args.threads}  torch {torch.__version__}")
    if "accuracy" in backbone:
        print(f"backbone classifier test accuracy: {backbone['accuracy']:.3f}")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
