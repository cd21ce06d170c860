"""Bad inputs fail loudly and say where: one table of cases, one test.

Each entry of CASES is ``(id, build, expected, names)``:

- ``build(tmp, fixture) -> Bad``: makes the bad input under the empty folder ``tmp`` and returns what to
  run. ``fixture(name)`` gives a pytest fixture (``fixture("tiny_bert_dir")``). ``Bad.call()`` runs the
  stage in-process: a stage function, or ``cli(...)`` (the ``moegate`` command through typer's CliRunner).
  ``Bad.outputs``: the files the stage would write; none may exist after a failure, so nothing is
  left looking finished.
- ``expected``: an exception class (``call()`` raises it); an int (``call()`` returns a CLI result with
  this exit code, nothing on stdout and no traceback); or SKIPPED (the stage finishes and its report
  names the bad row: the message checked is the report as JSON).
- ``names``: a substring the message must hold: the file, the row or the config key.

No message may hold SECRET, the value every case puts where a secret does not belong.
To add a case: write a build function (or a lambda over the helpers below) and append a row.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import DEMO, write_config
from typer.testing import CliRunner

from moegate.cli import app
from moegate.config import ConfigError, load
from moegate.errors import MoegateError
from moegate.layout import Layout
from moegate.stages.dataset import DatasetError, dataset
from moegate.stages.ingest import IngestError, ingest

SECRET = "sk-bad-inputs-c4n4ry-0f9e8d7c6b5a"
SKIPPED = "skipped"
EXPERTS = ["dsci_101", "dsci_dl_510", "dsci_vis_510"]
DIM = 4


@dataclass
class Bad:
    call: Callable[[], Any]
    outputs: list[Path] = field(default_factory=list)


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


# -- config: the results dir of every config here is tmp/results, which a config error never creates ----
def dataset_cli(tmp: Path, path: Path) -> Bad:
    return Bad(lambda: cli("dataset", "--config", path), [tmp / "results"])


def bad_config(**sections) -> Callable:
    """``moegate dataset`` on a valid config with ``sections`` replaced."""
    return lambda tmp, fixture: dataset_cli(tmp, write_config(tmp, **sections))


def raw_config(text: str) -> Callable:
    """``moegate dataset`` on a config file holding ``text``."""
    def build(tmp, fixture):
        path = tmp / "config.yaml"
        path.write_text(text)
        return dataset_cli(tmp, path)
    return build


def load_secret(**sections) -> Callable:
    """load() itself on a config that holds SECRET somewhere it must not."""
    def build(tmp, fixture):
        path = write_config(tmp, **sections)
        return Bad(lambda: load(path), [tmp / "results"])
    return build


# -- ingest: vector exports -------------------------------------------------------------------------
def rows(n: int = 6, dim: int = DIM) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"id": f"c{i}", "text": f"chunk {i}", "embedding": rng.normal(size=dim).round(4).tolist()}
            for i in range(n)]


def ingest_export(tmp: Path, source: Path) -> Bad:
    config = load(write_config(tmp, experts={"course": {"source": str(source)},
                                             "other": {"source": str(DEMO / "dsci_vis_510_data.jsonl")}}))
    layout = Layout.from_config(config)
    return Bad(lambda: ingest(config, "course"), [layout.kb("course"), layout.kb_report("course")])


def jsonl(lines: list) -> Callable:
    """A JSONL export of rows() followed by ``lines`` (dicts are dumped, strings written as they are)."""
    def build(tmp, fixture):
        path = tmp / "kb.jsonl"
        text = [json.dumps(r) for r in rows()] + [x if isinstance(x, str) else json.dumps(x) for x in lines]
        path.write_text("\n".join(text) + "\n")
        return ingest_export(tmp, path)
    return build


def export_file(name: str, content: bytes) -> Callable:
    def build(tmp, fixture):
        path = tmp / name
        path.write_bytes(content)
        return ingest_export(tmp, path)
    return build


def parquet_without_embedding(tmp, fixture):
    path = tmp / "kb.parquet"
    pd.DataFrame({"id": ["a"], "text": ["x"]}).to_parquet(path)
    return ingest_export(tmp, path)


# -- cluster and synthesize: hand-written KB and cluster tables -------------------------------------
def write_kb(config: dict, expert: str, embeddings: list, clusters: list[int] | None = None) -> None:
    layout = Layout.from_config(config)
    ids = [f"{expert}-{i}" for i in range(len(embeddings))]
    layout.kb(expert).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": ids, "text": [f"text of chunk {i} about things" for i in range(len(ids))],
                  "embedding": embeddings, "source": "test"}).to_parquet(layout.kb(expert))
    if clusters is not None:
        layout.clusters(expert).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"id": ids, "cluster": clusters, "probability": 1.0}).to_parquet(layout.clusters(expert))


def cluster_cli(tmp: Path, embeddings: list | None) -> Bad:
    path = write_config(tmp)
    config = load(path)
    if embeddings is not None:
        write_kb(config, "dsci_101", embeddings)
    layout = Layout.from_config(config)
    return Bad(lambda: cli("cluster", "--config", path, "--expert", "dsci_101"),
               [layout.clusters("dsci_101"), layout.cluster_summary("dsci_101")])


def synthesize_cli(tmp: Path, *, clusters: list[int], cluster_ids: list[str] | None = None, **sections) -> Bad:
    path = write_config(tmp, **sections)
    config = load(path)
    write_kb(config, "dsci_101", [[0.1] * DIM] * len(clusters), clusters)
    layout = Layout.from_config(config)
    if cluster_ids is not None:
        pd.DataFrame({"id": cluster_ids, "cluster": 0}).to_parquet(layout.clusters("dsci_101"))
    return Bad(lambda: cli("synthesize", "--config", path, "--expert", "dsci_101"),
               [layout.queries("dsci_101"), layout.queries_report("dsci_101")])


# -- dataset: labelled CSVs and synthesized queries -------------------------------------------------
def labelled(extra: list[tuple[str, str]], per_expert: int = 6, **dataset_keys) -> Callable:
    """A labelled CSV of ``per_expert`` good questions per expert plus ``extra`` (question, expert) rows."""
    def build(tmp, fixture):
        good = [(f"How does {e} topic {i} work?", e) for e in EXPERTS for i in range(per_expert)]
        csv = tmp / "labelled.csv"
        pd.DataFrame(good + extra, columns=["question", "expert"]).to_csv(csv, index=False)
        return dataset_stage(tmp, labelled_csv=str(csv), **dataset_keys)
    return build


def dataset_stage(tmp: Path, **dataset_keys) -> Bad:
    keys = {"kb_windows": {"enabled": False}, "teacher": {"enabled": False}, **dataset_keys}
    config = load(write_config(tmp, dataset=keys))
    layout = Layout.from_config(config)
    return Bad(lambda: dataset(config), [layout.dataset_report, layout.labels, layout.split("train")])


def expert_left_without_rows(tmp, fixture):
    """dsci_vis_510's only questions are blank or also asked under dsci_101 (ambiguous): none is left."""
    good = [(f"How does {e} topic {i} work?", e) for e in EXPERTS[:2] for i in range(6)]
    extra = [("", "dsci_vis_510"), ("How does dsci_101 topic 0 work?", "dsci_vis_510")]
    csv = tmp / "labelled.csv"
    pd.DataFrame(good + extra, columns=["question", "expert"]).to_csv(csv, index=False)
    return dataset_stage(tmp, labelled_csv=str(csv))


def csv_file(name: str, content: bytes) -> Callable:
    def build(tmp, fixture):
        path = tmp / name
        path.write_bytes(content)
        return dataset_stage(tmp, labelled_csv=str(path))
    return build


def queries(frames: dict[str, pd.DataFrame]) -> Callable:
    """queries/{expert}.parquet for the experts given (the others missing)."""
    def build(tmp, fixture):
        for expert, frame in frames.items():
            path = Layout(tmp / "results").queries(expert)
            path.parent.mkdir(parents=True, exist_ok=True)
            frame.to_parquet(path)
        return dataset_stage(tmp)
    return build


def some_queries(expert: str, label: str | None = None) -> pd.DataFrame:
    return pd.DataFrame({"query": [f"q{i} about {expert}?" for i in range(6)], "expert": label or expert,
                         "cluster": 0, "context_id": [f"{expert}/0/{i}" for i in range(6)], "backend": "offline",
                         "model": "offline-v1"})


# -- route: a tiny saved router, damaged ------------------------------------------------------------
_ROUTERS: dict[str, Path] = {}


def router_copy(tmp: Path, fixture) -> Path:
    """A copy (under tmp) of a 3-expert router on the tiny random BERT, saved once per session."""
    if "saved" not in _ROUTERS:
        from transformers import AutoModel, AutoTokenizer

        from moegate.models.dact import DactRouterModel, HeadConfig
        from moegate.router import save_router

        backbone = fixture("tiny_bert_dir")
        model = DactRouterModel(AutoModel.from_pretrained(backbone), len(EXPERTS),
                                HeadConfig(projection_dim=16, width=16))
        out = fixture("tmp_path_factory").mktemp("bad_inputs_router") / "router"
        save_router(out, model, AutoTokenizer.from_pretrained(backbone), labels=EXPERTS, max_length=16,
                    ponder_cost=0.1, metadata={})
        _ROUTERS["saved"] = out
    dst = tmp / "router"
    shutil.copytree(_ROUTERS["saved"], dst)
    return dst


def route(*questions: str, damage: Callable[[Path], None] | None = None, router: bool = True) -> Callable:
    """``moegate route`` of ``questions`` on a copy of the saved router after ``damage``, or on no router.
    Its output is stdout, which the test checks is empty."""
    def build(tmp, fixture):
        path = router_copy(tmp, fixture) if router else tmp / "no_router"
        if damage:
            damage(path)
        return Bad(lambda: cli("route", "--router", path, *(questions or ("what is a p-value?",))))
    return build


def truncate_weights(path: Path) -> None:
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def edit_config_json(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        change(config)
        (path / "config.json").write_text(json.dumps(config))
    return damage


# -- the table ------------------------------------------------------------------------------------------
CASES = [
    # config: a wrong key or value fails with its key path, before anything is written
    ("config-unknown-key", bad_config(cluster={"min_cluster_sise": 4}), 2, "min_cluster_sise"),
    ("config-wrong-type", bad_config(synthesize={"openai": {"concurrency": "four"}}), 2,
     "synthesize.openai.concurrency: 'four' is not of type 'integer'"),
    ("config-bad-enum", bad_config(cluster={"noise": "ignore"}), 2, "cluster.noise"),
    ("config-one-expert", bad_config(experts={"a": {"source": "a.jsonl"}}), 2, "experts:"),
    ("config-no-experts", raw_config("results: results\n"), 2, "'experts' is a required property"),
    ("config-not-yaml", raw_config("experts: [unclosed\n"), 2, "config.yaml: not valid YAML"),
    ("config-not-a-mapping", raw_config("- a\n- b\n"), 2, "config.yaml: expected a mapping"),
    ("config-missing-file", lambda tmp, fixture: dataset_cli(tmp, tmp / "nowhere.yaml"), 2,
     "nowhere.yaml: config file not found"),
    ("config-overlap-not-below-chunk", bad_config(ingest={"chunk_tokens": 32, "chunk_overlap": 32}), 2,
     "ingest.chunk_overlap"),
    ("config-no-training-split", bad_config(dataset={"val_fraction": 0.5, "test_fraction": 0.45}), 2,
     "dataset.val_fraction + dataset.test_fraction"),
    # config: secrets belong in the environment; the error names the key and never shows the value
    ("secret-storage-password", bad_config(tuning={"storage": f"postgresql+psycopg://bob:{SECRET}@db/x"}), 2,
     "tuning.storage holds a password"),
    ("secret-storage-password-parameter",
     load_secret(tuning={"storage": f"postgresql+psycopg://bob@db/x?password={SECRET}"}), ConfigError,
     "tuning.storage holds a ?password= parameter"),
    ("secret-base-url-credentials",
     bad_config(synthesize={"openai": {"base_url": f"https://user:{SECRET}@host/v1"}}), 2,
     "synthesize.openai.base_url holds credentials"),
    ("secret-key-in-api_key_env", bad_config(synthesize={"openai": {"api_key_env": SECRET}}), 2,
     "synthesize.openai.api_key_env: expected the name of an environment variable"),
    ("secret-key-in-password_env", load_secret(tuning={"password_env": "Zx9" + SECRET.replace("-", "") * 2}),
     ConfigError, "tuning.password_env: expected the name of an environment variable"),
    # the command line: names that match nothing
    ("cli-unknown-expert", lambda tmp, fixture: Bad(lambda: cli("ingest", "--config", write_config(tmp),
                                                                 "--expert", "nobody"), [tmp / "results"]),
     2, "--expert 'nobody' is not in config.experts"),
    ("cli-unknown-study", lambda tmp, fixture: Bad(lambda: cli("tune", "worker", "nonsense", "--config", write_config(tmp)),
                                                   [tmp / "results"]),
     2, "unknown study 'nonsense'"),
    # ingest: an export that cannot be read is an error naming the file and line
    ("kb-two-embedding-lengths", jsonl([{"id": "w", "text": "x", "embedding": [0.1] * (DIM + 2)}]), IngestError,
     "embeddings of 2 different lengths: 4 (6 row(s), first at line 1), 6 (1 row(s), first at line 7)"),
    ("kb-line-not-json", jsonl(['{"id": "broken", "text": ']), IngestError, "kb.jsonl: line 7: not valid JSON"),
    ("kb-line-not-an-object", jsonl(["[1, 2]"]), IngestError, "kb.jsonl: line 7: expected a JSON object"),
    ("kb-not-utf8", export_file("kb.jsonl", b'{"id": "a", "text": "caf\xe9", "embedding": [1]}\n'),
     IngestError, "kb.jsonl: not UTF-8 text (bad byte at offset 24)"),
    ("kb-unknown-file-type", export_file("kb.csv", b"id,text\n"), IngestError, "kb.csv: unknown vector export type"),
    ("kb-parquet-without-embedding", parquet_without_embedding, IngestError, "kb.parquet: missing column(s) embedding"),
    ("kb-no-usable-rows", export_file("kb.jsonl", b'{"id": "a", "text": "", "embedding": [1.0]}\n'), IngestError,
     "no usable rows (1 read; skipped: missing_text 1)"),
    ("kb-source-missing", lambda tmp, fixture: ingest_export(tmp, tmp / "gone.jsonl"), IngestError,
     "gone.jsonl does not exist"),
    # ingest: a malformed row is skipped, counted and named in kb/{expert}.report.json
    ("kb-huge-integer", jsonl([{"id": "big", "text": "x", "embedding": [0.1] * (DIM - 1) + [10**400]}]), SKIPPED,
     '"out_of_range_embedding": ["line 7 (id \'big\')"]'),
    ("kb-true-in-embedding", jsonl([{"id": "yes", "text": "x", "embedding": [0.1] * (DIM - 1) + [True]}]),
     SKIPPED, '"non_numeric_embedding": ["line 7 (id \'yes\')"]'),
    ("kb-nan-in-embedding", jsonl(['{"id": "nan", "text": "x", "embedding": [NaN, 1, 2, 3]}']), SKIPPED,
     '"non_finite_embedding": ["line 7 (id \'nan\')"]'),
    ("kb-string-embedding", jsonl([{"id": "s", "text": "x", "embedding": "0.1, 0.2"}]), SKIPPED,
     '"non_numeric_embedding": ["line 7 (id \'s\')"]'),
    ("kb-missing-id", jsonl([{"text": "x", "embedding": [0.1] * DIM}]), SKIPPED, '"missing_id": ["line 7"]'),
    ("kb-duplicate-id", jsonl([{"id": "c0", "text": "again", "embedding": [0.1] * DIM}]), SKIPPED,
     '"duplicate_id": ["line 7 (id \'c0\')"]'),
    # cluster and synthesize: their inputs are named
    ("cluster-kb-missing", lambda tmp, fixture: cluster_cli(tmp, None), 2, "kb/dsci_101.parquet: missing"),
    ("cluster-kb-two-dimensions", lambda tmp, fixture: cluster_cli(tmp, [[0.1] * 3] * 5 + [[0.1] * 4] * 5), 2,
     "embeddings of several dimensions [3, 4]"),
    ("synthesize-kb-missing", lambda tmp, fixture: Bad(
        lambda: cli("synthesize", "--config", write_config(tmp), "--expert", "dsci_101"),
        [Layout(tmp / "results").queries("dsci_101")]), 2, "kb/dsci_101.parquet: missing (run the ingest stage"),
    ("synthesize-clusters-of-another-kb",
     lambda tmp, fixture: synthesize_cli(tmp, clusters=[0, 0], cluster_ids=["dsci_101-0", "zz"]), 2,
     "clusters/dsci_101.parquet: 1 id(s) not in"),
    ("synthesize-key-variable-unset", lambda tmp, fixture: synthesize_cli(
        tmp, clusters=[0, 0], synthesize={"backend": "openai", "openai": {"api_key_env": "MOEGATE_UNSET_KEY_VAR"}}),
     2, "environment variable MOEGATE_UNSET_KEY_VAR is not set"),
    # dataset: labels, experts and files
    ("csv-unknown-labels", labelled([("What is E1?", "E1 "), ("And E1?", "E1"), ("Upper?", "DSCI_101")]),
     DatasetError, ("'E1' (2 row(s), first in data row 19), 'DSCI_101' (1 row(s), first in data row 21, "
                    "did you mean 'dsci_101'?)")),
    ("csv-unknown-labels-dropped-on-request",
     labelled([("What is E1?", "E1"), ("Upper?", "DSCI_101")], drop_unknown_labels=True), SKIPPED,
     '"unknown_expert": 2'),
    ("csv-expert-left-without-rows", expert_left_without_rows, DatasetError,
     "no usable question left for expert(s) 'dsci_vis_510' (2 row(s) in, all empty, ambiguous or duplicates)"),
    ("csv-missing-column", csv_file("labelled.csv", b"text,expert\nWhat?,dsci_101\n"), DatasetError,
     "labelled.csv: missing column(s) ['question']"),
    ("csv-not-found", lambda tmp, fixture: dataset_stage(tmp, labelled_csv=str(tmp / "nowhere.csv")), DatasetError,
     "nowhere.csv: labelled CSV not found"),
    ("csv-not-utf8", csv_file("labelled.csv", b"question,expert\ncaf\xe9?,dsci_101\n"), DatasetError,
     "labelled.csv: not a readable CSV"),
    ("csv-context-under-two-experts", csv_file("labelled.csv", b"question,expert,context_id\n"
                                                               b"a?,dsci_101,p1\nb?,dsci_dl_510,p1\n"),
     DatasetError, "labelled.csv: context_id 'p1' appears under experts"),
    ("queries-missing", queries({e: some_queries(e) for e in EXPERTS[:2]}), DatasetError,
     "queries/dsci_vis_510.parquet: missing (did `moegate synthesize --expert dsci_vis_510` run?)"),
    ("queries-of-another-expert", queries({**{e: some_queries(e) for e in EXPERTS[:2]},
                                           "dsci_vis_510": some_queries("dsci_vis_510", label="dsci_101")}),
     DatasetError, "dsci_vis_510.parquet: expert column holds ['dsci_101']"),
    # route: the question and the router directory
    ("route-non-utf8-question", route("fine", "caf\udce9?"), 2, "question 2: not valid UTF-8 text"),
    ("route-no-router-dir", route(router=False), 2, "no_router: router directory not found"),
    ("route-truncated-weights", route(damage=truncate_weights), 2, "model.safetensors"),
    ("route-config-json-not-json", route(damage=lambda p: (p / "config.json").write_text("{oops")), 2,
     "config.json: not valid JSON"),
    ("route-labels-differ-from-weights", route(damage=edit_config_json(lambda c: c["labels"].append("extra"))), 2,
     "model.safetensors: does not match the model described by config.json"),
    ("route-tokenizer-json-deleted", route(damage=lambda p: (p / "tokenizer.json").unlink()), 2,
     "router/tokenizer.json: missing, one of the tokenizer files saved with this router"),
    ("route-nan-weights", route(damage=lambda p: (p / "model.safetensors").write_bytes(
        (p / "model.safetensors").read_bytes()[:-64] + b"\xff" * 64)), 2,
     "model.safetensors: NaN or infinite values in tensor(s)"),
    ("route-unknown-exit-rule", route(damage=edit_config_json(lambda c: c["exit_rule"].update(name="dact_bound_v2"))),
     2, "exit_rule 'dact_bound_v2' is not a rule this moegate implements (known: 'dact_bound')"),
]


@pytest.mark.parametrize(("build", "expected", "names"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_fails_loudly_and_names_where(tmp_path, request, build, expected, names):
    bad = build(tmp_path, request.getfixturevalue)
    if expected is SKIPPED:
        message = json.dumps(bad.call())
    elif isinstance(expected, int):
        result = bad.call()
        message = result.stderr
        assert result.exit_code == expected, (result.exit_code, result.output, result.exception)
        assert message.startswith(("error: ", "moegate route: ")) and "Traceback" not in result.output, message
        assert result.stdout == "", result.stdout  # nothing that reads as a result
    else:
        with pytest.raises(expected) as caught:
            bad.call()
        assert isinstance(caught.value, MoegateError)  # so the CLI prints it as one line
        message = str(caught.value)
    assert names in message, message
    assert SECRET not in message
    if expected is not SKIPPED:
        left = [str(p) for p in bad.outputs if p.exists()]
        assert not left, f"output left behind after a failure: {left}"


def test_the_table_is_big_enough_and_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)
