"""The Snakemake workflow itself: dry runs, lint, and a real run of the data stages on the demo.

Every call runs the real ``snakemake`` of this venv in the repository root with a temporary results
dir (``--config results=...``), so nothing lands in the checkout's own results/.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO

BIN = Path(sys.executable).parent
OPENSTAX = REPO / "workflow" / "configs" / "openstax.yaml"
DEMO_EXPERTS = ["dsci_101", "dsci_dl_510", "dsci_vis_510"]
DATA_RULES = ("ingest", "cluster", "synthesize")


def snakemake(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # jobs call `moegate`
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [str(BIN / "snakemake"), *args],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: {rule: jobs}."""
    counts, in_table = {}, False
    for line in output.splitlines():
        if re.match(r"^job\s+count\s*$", line):
            in_table = True
        elif in_table and (m := re.match(r"^(\w+)\s+(\d+)\s*$", line)):
            if m.group(1) == "total":
                break
            counts[m.group(1)] = int(m.group(2))
    return counts


def test_dry_run_of_the_shipped_config_lists_the_whole_dag(tmp_path):
    run = snakemake("-n", "--cores", "2", "--config", f"results={tmp_path / 'results'}")
    assert run.returncode == 0, run.stderr + run.stdout
    counts = job_counts(run.stdout + run.stderr)
    for rule in DATA_RULES:
        assert counts.get(rule) == len(DEMO_EXPERTS), (rule, counts)
    assert counts.get("dataset") == 1 and counts.get("all") == 1
    for rule in ("train_backbone", "tune_worker", "train_router", "evaluate"):
        assert counts.get(rule, 0) >= 1, (rule, counts)
    resolved = yaml.safe_load((tmp_path / "results" / "config.resolved.yaml").read_text())
    assert resolved["results"] == str(tmp_path / "results") and list(resolved["experts"]) == DEMO_EXPERTS


@pytest.mark.skipif(
    not (REPO.parent / "shared" / "data" / "openstax").is_dir(),
    reason="the OpenStax books are not beside this checkout (../shared/data/openstax)",
)
def test_dry_run_of_the_openstax_config_has_ten_experts(tmp_path):
    run = snakemake(
        "-n",
        "--cores",
        "2",
        "--configfile",
        str(OPENSTAX),
        "--replace-workflow-config",
        "--config",
        f"results={tmp_path / 'results'}",
    )
    assert run.returncode == 0, run.stderr + run.stdout
    counts = job_counts(run.stdout + run.stderr)
    assert {r: counts.get(r) for r in DATA_RULES} == dict.fromkeys(DATA_RULES, 10), counts
    experts = yaml.safe_load(OPENSTAX.read_text())["experts"]
    for name, expert in experts.items():  # the relative sources resolve from the repo root
        assert (REPO / expert["source"]).is_dir(), f"{OPENSTAX}: experts.{name}.source not found"


def test_dry_run_with_a_labelled_csv_needs_no_synthesis(tmp_path):
    csv = tmp_path / "labelled.csv"
    csv.write_text("question,expert\nWhat is a DataFrame?,dsci_101\n")
    results = tmp_path / "results"
    run = snakemake(
        str(results / "dataset" / "report.json"),
        "-n",
        "--cores",
        "1",  # targets before --config,
        "--config",
        f"results={results}",
        f"dataset={{'labelled_csv': '{csv}'}}",
    )  # which takes the rest
    assert run.returncode == 0, run.stderr + run.stdout
    assert job_counts(run.stdout + run.stderr) == {"dataset": 1}


# Lints that remain in rules the author of this test does not own (as of 2026-11-25), each with why it
# stands; any other lint, or any lint on rules/dataset.smk, fails the test. The fix for the first two is
# what rules/dataset.smk does: `conda: "../envs/moegate.yaml"` and `params: config=CONFIG`.
KNOWN_LINTS = {
    # ingest, cluster, train_backbone, tune_*, train_router, evaluate name no conda env yet
    "Specify a conda environment or container for each rule.",
    # the same rules read the resolved config path from the global CONFIG in their shell command
    "Shell command directly uses variable CONFIG from outside of the rule",
    # rules/common.smk (helpers + localrules), rules/ingest.smk (ingest_inputs), rules/tune.smk
    "Mixed rules and functions in same snakefile.",
}


def parse_lints(text: str) -> dict[str, set[str]]:
    """Snakemake's text lint report → {'rule X' or 'snakefile P': {lint titles}}."""
    lints: dict[str, set[str]] = {}
    target = None
    for line in text.splitlines():
        if m := re.match(r"^Lints for (rule \w+|snakefile \S+?)(?: \(line.*)?:\s*$", line):
            target = m.group(1)
            lints[target] = set()
        elif target and (m := re.match(r"^    \* (.+?):?\s*$", line)):
            lints[target].add(m.group(1).rstrip(":"))
    return lints


def test_lint_leaves_only_documented_warnings(tmp_path):
    run = snakemake("--lint", "--config", f"results={tmp_path / 'results'}")
    text = run.stdout + run.stderr
    lints = parse_lints(text)
    assert run.returncode == 0 or lints, text  # rc 1 only because lints were printed
    assert "rule dataset" not in lints, lints.get("rule dataset")
    unexpected = {t: titles - KNOWN_LINTS for t, titles in lints.items() if titles - KNOWN_LINTS}
    assert not unexpected, unexpected


def test_real_run_of_the_data_stages_on_the_demo(tmp_path):
    """ingest → cluster → synthesize → dataset for real on the shipped demo (3 experts, 306 chunks)."""
    results = tmp_path / "results"
    target = str(results / "dataset" / "report.json")
    run = snakemake(target, "--cores", "2", "--config", f"results={results}", timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    queries = {}
    for expert in DEMO_EXPERTS:
        lines = sum(1 for line in (REPO / config["experts"][expert]["source"]).open() if line.strip())
        kb = pd.read_parquet(results / "kb" / f"{expert}.parquet")
        assert 0.9 * lines <= len(kb) <= lines, (expert, len(kb), lines)
        clusters = pd.read_parquet(results / "clusters" / f"{expert}.parquet")
        assert set(clusters["id"]) <= set(kb["id"]) and len(clusters) > 0.5 * len(kb)
        queries[expert] = pd.read_parquet(results / "queries" / f"{expert}.parquet")
        assert len(queries[expert]) > 0 and set(queries[expert]["expert"]) == {expert}
        assert queries[expert]["context_id"].str.startswith(f"{expert}/").all()

    report = json.loads((results / "dataset" / "report.json").read_text())
    assert report["rows_in"] == sum(len(q) for q in queries.values())
    splits = {s: pd.read_parquet(results / "dataset" / f"{s}.parquet") for s in ("train", "val", "test")}
    assert sum(len(f) for f in splits.values()) == report["rows_out"]
    questions = sum(int((f["kind"] == "question").sum()) for f in splits.values())  # KB windows join train
    assert 0.8 * report["rows_in"] <= questions <= report["rows_in"]
    for name, frame in splits.items():
        assert set(frame["expert"]) == set(DEMO_EXPERTS), name
    seen = [set(f["context_id"]) for f in splits.values()]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert json.loads((results / "dataset" / "labels.json").read_text()) == {"labels": DEMO_EXPERTS}
    for s in splits:
        assert (results / "dataset" / "tokenized" / f"{s}.safetensors").stat().st_size > 0

    # a rerun has nothing to do; after a run that died in one expert's synthesize job (its queries and
    # the dataset missing) only that job and the dataset run again
    again = snakemake(target, "-n", "--cores", "2", "--config", f"results={results}")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    (results / "queries" / "dsci_vis_510.parquet").unlink()
    (results / "dataset" / "report.json").unlink()
    again = snakemake(target, "-n", "--cores", "2", "--config", f"results={results}")
    assert job_counts(again.stdout + again.stderr) == {"synthesize": 1, "dataset": 1}


# -- secrets never reach a file -------------------------------------------------------------------
KEY_CANARY = "sk-canary-7d1f0c9e5b3a4f26a8e1"
PASSWORD_CANARY = "pw-canary-4b9e2d7a1c"


def run_in(workdir: Path, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """snakemake on the repository's Snakefile with ``workdir`` as its working directory, so its
    config.yaml, results/ and .snakemake/ all live there."""
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args],
                          check=False, cwd=workdir, env=full_env, capture_output=True, text=True, timeout=timeout)


def files_holding(root: Path, secret: str) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def small_demo(workdir: Path, rows: int = 24) -> dict:
    """Two experts of ``rows`` demo chunks each (a vector export each: no encoder needed)."""
    experts = {}
    for name in DEMO_EXPERTS[:2]:
        source = workdir / f"{name}.jsonl"
        lines = (REPO / "data" / "demo" / f"{name}_data.jsonl").read_text().splitlines()[:rows]
        source.write_text("\n".join(lines) + "\n")
        experts[name] = {"source": str(source)}
    return experts


@pytest.mark.parametrize("section", [
    {"tuning": {"storage": f"postgresql+psycopg://bob:{PASSWORD_CANARY}@db/x"}},
    {"synthesize": {"openai": {"base_url": f"https://user:{KEY_CANARY}@host/v1"}}},
    {"synthesize": {"openai": {"api_key_env": KEY_CANARY}}},
], ids=["storage-password", "base-url-credentials", "key-in-api_key_env"])
def test_a_secret_in_the_config_stops_a_dry_run_before_anything_is_written(tmp_path, section):
    config = {"experts": small_demo(tmp_path, rows=2), **section}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = run_in(tmp_path, "-n", "--cores", "1")
    key = next(iter(section)) + "." + next(iter(next(iter(section.values()))))
    assert run.returncode != 0 and key in run.stdout + run.stderr, run.stdout + run.stderr
    assert not (tmp_path / "results").exists()
    for secret in (KEY_CANARY, PASSWORD_CANARY):
        assert secret not in run.stdout + run.stderr
        assert files_holding(tmp_path, secret) in ([], ["config.yaml"])


def test_secrets_in_the_environment_reach_no_file_of_a_run(tmp_path):
    """ingest → cluster → synthesize (openai, against the loopback stub) with the key and the database
    password in the environment: the stub gets the key, and no file of results/ or .snakemake/ holds either."""
    from llm_stub import StubLLM

    with StubLLM() as stub:
        config = {
            "experts": small_demo(tmp_path),
            "cluster": {"min_cluster_size": 3},
            "synthesize": {"backend": "openai", "questions_per_context": 2, "context_tokens": 200,
                           "openai": {"model": "stub-model", "base_url": stub.url, "concurrency": 2}},
            "tuning": {"storage": "postgresql+psycopg://moegate@127.0.0.1:1/moegate"},
        }
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        targets = [f"results/queries/{e}.parquet" for e in config["experts"]]
        run = run_in(tmp_path, *targets, "--cores", "2", timeout=300,
                     env={"OPENAI_API_KEY": KEY_CANARY, "MOEGATE_DB_PASSWORD": PASSWORD_CANARY})
        assert run.returncode == 0, run.stderr[-4000:]
        assert stub.count > 0 and set(stub.auth_headers) == {f"Bearer {KEY_CANARY}"}
    for target in targets:
        assert (tmp_path / target).is_file()
    assert (tmp_path / ".snakemake" / "log").is_dir() and (tmp_path / "results" / "config.resolved.yaml").is_file()
    for secret in (KEY_CANARY, PASSWORD_CANARY):
        assert secret not in run.stdout + run.stderr
        for folder in ("results", ".snakemake"):
            assert files_holding(tmp_path / folder, secret) == [], (folder, secret)
