"""The ``moegate`` command line: one subcommand per workflow rule, plus route and serve.

Every stage takes ``--config`` (the same YAML the Snakefile reads) and writes to the results layout
in :mod:`moegate.layout`. Modules are imported inside each command so ``moegate --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from moegate.config import load
from moegate.errors import MoegateError

EXIT_USER_ERROR = 2  # a MoegateError: a config key, an input file or row, a name; the message says which


class _Commands(TyperGroup):
    """The subcommands, with MoegateError caught once for all of them: one line on stderr, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MoegateError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True,
                  help="moegate: the gate of a Mixture of RAG experts.")

ConfigOpt = typer.Option(Path("config.yaml"), "--config", "-c", help="run configuration (YAML)")


def _config(path: Path) -> dict:
    return load(path)


def _expert(config: dict, name: str) -> str:
    """``--expert``, checked against config.experts (MoegateError naming the known ones)."""
    if name not in config["experts"]:
        raise MoegateError(f"--expert {name!r} is not in config.experts (known: {', '.join(config['experts'])})")
    return name


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def ingest(expert: str = typer.Option(..., help="expert name from config.experts"), config: Path = ConfigOpt) -> None:
    """Read one expert's knowledge base into kb/{expert}.parquet."""
    from moegate.ingest import ingest as run

    cfg = _config(config)
    run(cfg, _expert(cfg, expert))


@app.command()
def cluster(expert: str = typer.Option(...), config: Path = ConfigOpt) -> None:
    """PCA + HDBSCAN over one expert's chunk embeddings."""
    from moegate.cluster import cluster as run

    cfg = _config(config)
    run(cfg, _expert(cfg, expert))


@app.command()
def synthesize(expert: str = typer.Option(...), config: Path = ConfigOpt) -> None:
    """Write likely student questions for each context of one expert's clusters."""
    from moegate.synthesize import synthesize as run

    cfg = _config(config)
    run(cfg, _expert(cfg, expert))


@app.command()
def dataset(config: Path = ConfigOpt) -> None:
    """Merge, deduplicate, split (grouped by context) and tokenize the queries."""
    from moegate.dataset import dataset as run

    run(_config(config))


@app.command()
def states(config: Path = ConfigOpt) -> None:
    """Cache every dataset row's per-layer pooled states under the frozen encoder."""
    from moegate.states import states as run

    run(_config(config))


@app.command("train-backbone")
def train_backbone(config: Path = ConfigOpt) -> None:
    """Fine-tune the backbone classifier (resumes from its last checkpoint)."""
    from moegate.train_backbone import train_backbone as run

    run(_config(config))


@app.command()
def tune(
    study: str = typer.Argument(..., help="backbone | submodels | training | lambda"),
    config: Path = ConfigOpt,
    worker: Optional[int] = typer.Option(None, help="run one worker in this process (what a Snakemake job does)"),
    workers: Optional[int] = typer.Option(None, help="launch N workers (default tuning.workers)"),
    launcher: str = typer.Option("slurm", help="slurm (submitit job array) | local (processes here)"),
    collect: bool = typer.Option(False, "--collect", help="write tuning/{study}.json from the finished study"),
    create: bool = typer.Option(False, "--create", help="create the study in the storage (before workers start)"),
) -> None:
    """Run Optuna workers for one study, or create it, or collect its best values."""
    from moegate import tune as tuning
    from moegate.layout import STUDIES

    cfg = _config(config)
    if study not in STUDIES:
        raise MoegateError(f"unknown study {study!r}; expected one of {', '.join(STUDIES)}")
    if collect:
        tuning.collect(cfg, study)
    elif create:
        tuning.create(cfg, study)
    elif worker is not None:
        tuning.worker(cfg, study, worker)
    else:
        tuning.launch(cfg, study, workers=workers, launcher=launcher, config_path=config)


@app.command("train-router")
def train_router(config: Path = ConfigOpt) -> None:
    """Train the DACT router from the fine-tuned backbone and the tuned values."""
    from moegate.train_router import train_router as run

    run(_config(config))


@app.command()
def evaluate(config: Path = ConfigOpt) -> None:
    """Score the router, its full-depth self and the backbone on the test split."""
    from moegate.evaluate import evaluate as run

    run(_config(config))


@app.command()
def route(
    questions: List[str] = typer.Argument(..., help="questions to route"),
    router: Path = typer.Option(..., "--router", help="a router directory (results/router)"),
    top_k: Optional[int] = typer.Option(None, help="keep only the k most likely experts in .distribution"),
    abstain_below: Optional[float] = typer.Option(None, help="expert=null below this top probability"),
) -> None:
    """Route questions; print one JSON object per question."""
    from moegate.router import Router

    for i, q in enumerate(questions, start=1):
        _check_text(q, f"question {i}")
    try:
        gate = Router.from_pretrained(router)
        results = gate.route(questions, top_k=top_k, abstain_below=abstain_below)
    except (FileNotFoundError, ValueError) as e:  # a broken router dir or bad option: say which, no traceback
        typer.echo(f"moegate route: {e}", err=True)
        raise typer.Exit(2) from None
    for q, r in zip(questions, results):
        typer.echo(json.dumps({"question": q, **r.to_dict()}))


def _check_text(text: str, where: str) -> None:
    """MoegateError when ``text`` is not valid UTF-8 (bytes that are not UTF-8 reach argv as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MoegateError(f"{where}: not valid UTF-8 text (undecodable byte at character {e.start + 1}); "
                           "pass UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def run() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    run()
