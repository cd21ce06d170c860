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


def _version(value: bool) -> None:
    if value:
        from moegate import __version__

        typer.echo(f"moegate {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="print the version and exit"),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def ingest(expert: str = typer.Option(..., help="expert name from config.experts"), config: Path = ConfigOpt) -> None:
    """Read one expert's knowledge base into kb/{expert}.parquet."""
    from moegate.stages.ingest import ingest as run

    cfg = _config(config)
    run(cfg, _expert(cfg, expert))


@app.command()
def cluster(expert: str = typer.Option(..., help="expert name from config.experts"), config: Path = ConfigOpt) -> None:
    """PCA + HDBSCAN over one expert's chunk embeddings."""
    from moegate.stages.cluster import cluster as run

    cfg = _config(config)
    run(cfg, _expert(cfg, expert))


@app.command()
def synthesize(expert: str = typer.Option(..., help="expert name from config.experts"), config: Path = ConfigOpt) -> None:
    """Write likely student questions for each context of one expert's clusters."""
    from moegate.stages.synthesize import synthesize as run

    cfg = _config(config)
    run(cfg, _expert(cfg, expert))


@app.command()
def dataset(config: Path = ConfigOpt) -> None:
    """Merge, deduplicate, split (grouped by context) and tokenize the queries."""
    from moegate.stages.dataset import dataset as run

    run(_config(config))


@app.command()
def states(config: Path = ConfigOpt) -> None:
    """Cache every dataset row's per-layer pooled states under the frozen encoder."""
    from moegate.stages.states import states as run

    run(_config(config))


@app.command("train-backbone")
def train_backbone(config: Path = ConfigOpt) -> None:
    """Fine-tune the backbone classifier (resumes from its last checkpoint)."""
    from moegate.stages.train_backbone import train_backbone as run

    run(_config(config))


def _study(name: str) -> str:
    """A study name from :mod:`moegate.studies`; an unknown one is a MoegateError (one line, exit 2)."""
    from moegate import studies

    return studies.get(name).name


def _study_argument():
    from moegate.studies import NAMES

    # a plain str checked by the registry rather than an Enum: a click choice error is a usage block, not one line
    return typer.Argument(..., callback=_study, metavar="STUDY", show_default=False, autocompletion=lambda: list(NAMES),
                          help=f"one of {', '.join(NAMES)} (moegate.studies, in the order they run)")


class _TuneCommands(_Commands):
    """``moegate tune ACTION STUDY``; the old ``moegate tune STUDY --flag`` form gets a one-line pointer."""

    def resolve_command(self, ctx, args):
        from moegate.studies import NAMES

        if args and args[0] not in self.commands and (args[0] in NAMES or not args[0].startswith("-")):
            raise MoegateError(f"moegate tune: no action {args[0]!r}; expected moegate tune "
                               f"{{{'|'.join(self.commands)}}} STUDY (STUDY: one of {', '.join(NAMES)})")
        return super().resolve_command(ctx, args)


tune_app = typer.Typer(cls=_TuneCommands, no_args_is_help=True,
                       help="Optuna studies: create one, run its workers, collect its chosen values.")
app.add_typer(tune_app, name="tune")


@tune_app.command("create")
def tune_create(study: str = _study_argument(), config: Path = ConfigOpt) -> None:
    """Create the study in the storage (once, before its workers start): the tune_create rule."""
    from moegate.stages import tune as tuning

    tuning.create(_config(config), study)


@tune_app.command("worker")
def tune_worker(
    study: str = _study_argument(),
    index: int = typer.Option(0, "--index", "-i", min=0,
                              help="this worker's number (0 .. tuning.workers-1): its seed and log name"),
    config: Path = ConfigOpt,
) -> None:
    """Run one worker in this process until the study's shared budget is met: the tune_worker rule."""
    from moegate.stages import tune as tuning

    tuning.worker(_config(config), study, index)


@tune_app.command("collect")
def tune_collect(study: str = _study_argument(), config: Path = ConfigOpt) -> None:
    """Write tuning/{study}.json (λ: also its Pareto table and plot) from the finished study: the collect rule."""
    from moegate.stages import tune as tuning

    tuning.collect(_config(config), study)


@app.command("train-router")
def train_router(config: Path = ConfigOpt) -> None:
    """Train the DACT router from the fine-tuned backbone and the tuned values."""
    from moegate.stages.train_router import train_router as run

    run(_config(config))


@app.command()
def evaluate(config: Path = ConfigOpt) -> None:
    """Score the router, its full-depth self and the backbone on the test split."""
    from moegate.stages.evaluate import evaluate as run

    run(_config(config))


@app.command()
def route(
    questions: List[str] = typer.Argument(..., help="questions to route; '-' reads one question a line from stdin"),
    router: Path = typer.Option(..., "--router", help="a router directory (results/router)"),
    top_k: Optional[int] = typer.Option(None, help="keep only the k most likely experts in .distribution"),
    abstain_below: Optional[float] = typer.Option(
        None, help="expert=null where the router's abstain score (kb_similarity or probability) is below this; "
                   "default: the router's calibrated threshold"),
) -> None:
    """Route questions; print one JSON object per question."""
    from moegate.router import Router

    from_stdin = questions == ["-"]
    if not from_stdin:
        for i, q in enumerate(questions, start=1):
            _check_text(q, f"question {i}")
    try:
        gate = Router.from_pretrained(router)
        gate.route_options(top_k, abstain_below)
        batches = _stdin_questions(STDIN_BATCH) if from_stdin else [questions]
        for batch in batches:  # stdin is routed a batch at a time: the first lines print before the last are read
            for q, r in zip(batch, gate.route(batch, top_k=top_k, abstain_below=abstain_below), strict=True):
                typer.echo(json.dumps({"question": q, **r.to_dict()}))
    except (FileNotFoundError, ValueError) as e:  # a broken router dir or bad option: say which, no traceback
        typer.echo(f"moegate route: {e}", err=True)
        raise typer.Exit(2) from None


STDIN_BATCH = 64  # questions per model call for `moegate route -`


def _stdin_questions(size: int):
    """Batches of the non-blank lines of stdin (one question a line, surrounding whitespace stripped)."""
    batch = []
    for number, line in enumerate(sys.stdin, start=1):
        text = line.strip()
        if not text:
            continue
        _check_text(text, f"stdin line {number}")
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@app.command()
def serve(
    router: Path = typer.Option(..., "--router", help="a router directory (results/router); nothing else is needed"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, help="TCP port (0: any free one, printed at startup)"),
    max_batch: int = typer.Option(64, help="dynamic batching: most questions per model call"),
    max_wait_ms: float = typer.Option(2.0, help="dynamic batching: most a request waits for others to join its batch"),
    max_questions: int = typer.Option(64, help="most questions in one request (more: 413)"),
    max_body_bytes: int = typer.Option(1 << 20, help="largest request body (more: 413)"),
    batching: bool = typer.Option(True, "--batching/--no-batching", help="gather concurrent requests into one batch"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    threads: Optional[int] = typer.Option(None, help="torch threads for inference (default: half the cores)"),
    access_log: bool = typer.Option(False, "--access-log/--no-access-log", help="one log line per request"),
) -> None:
    """Serve a router over HTTP: POST /route, GET /healthz, GET /metrics (Prometheus), /docs."""
    from moegate.serve import serve as run

    run(router, host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms, max_questions=max_questions,
        batching=batching, max_body_bytes=max_body_bytes, device=device, access_log=access_log, threads=threads)


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
