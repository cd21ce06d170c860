# Helpers shared by the rule files: the results layout, the expert list and the resolved config.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))  # run from a checkout without installing

from moegate.config import dump as dump_config
from moegate.config import validate as validate_config
from moegate.layout import STUDIES, Layout

validate_config(config, source="snakemake config")
L = Layout.from_config(config)
EXPERTS = list(config["experts"])
WORKERS = list(range(config["tuning"]["workers"]))


wildcard_constraints:
    expert="|".join(EXPERTS),
    study="|".join(STUDIES),
    worker=r"\d+",


def resolved_config():
    """The config of this run (files + --config overrides) as one file every job reads.

    Rewritten only when its content changes, so reparsing inside a job never touches it.
    """
    path = L.resolved_config
    text = dump_config(config)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return str(path)


CONFIG = resolved_config()


def expert_source(wildcards):
    return config["experts"][wildcards.expert]["source"]


def all_queries(wildcards):
    if config["dataset"]["labelled_csv"]:
        return [config["dataset"]["labelled_csv"]]
    return [str(L.queries(e)) for e in EXPERTS]


def final_outputs():
    outs = []
    for e in EXPERTS:
        outs += [str(L.cluster_summary(e)), str(L.cluster_plot(e))]
    outs += [str(L.router / "model.safetensors"), str(L.router / "metrics.json")]
    outs += [str(L.tuning / "lambda_pareto.csv")]
    return outs
