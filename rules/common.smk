# Helpers shared by all rule files (the results layout, the expert list, the resolved config).
import sys
from pathlib import Path

# run from a checkout without installing
sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from moegate.config import dump as dump_config
from moegate.config import validate as validate_config
from moegate import studies
from moegate.layout import Layout

validate_config(config, source="snakemake config")
L = Layout.from_config(config)
if workflow.remote_exec and L.resolved_config.is_file():
    # A Slurm job parses the workflow again, but Snakemake 9.27 does not pass it --replace-workflow-config,
    # so config.yaml would be merged back in: the job takes the config its login-node run resolved.
    import yaml

    config.clear()
    config.update(yaml.safe_load(L.resolved_config.read_text()))
EXPERTS = list(config["experts"])
WORKERS = list(range(config["tuning"]["workers"]))
STUDIES = list(studies.NAMES)


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


def ingest_inputs(wildcards):
    """The expert's vector export, or every document its folder holds (so an edited page reruns ingest)."""
    from moegate.stages.ingest import find_documents

    source = Path(expert_source(wildcards))
    if source.is_dir():
        documents, _ = find_documents(source, config["ingest"]["exclude"])
        return [str(path) for path in documents] or [str(source)]
    return [str(source)]


def on_dataset_change(paths, rerun):
    """``paths`` as inputs whose change reruns the job (``rerun``), or, as ``ancient()``, whose change does
    not: the job then runs only when its own outputs are missing (or it is forced).

    Plain copies: ancient() flags the string it is given, and rules.dataset.output's are shared.
    """
    paths = [str(p) for p in paths]
    return paths if rerun else [ancient(p) for p in paths]


def tune_inputs(wildcards):
    """The dataset, the encoder (router studies) and the chosen values of the studies it runs after.

    With tuning.rerun_on_dataset_change false, a rebuilt dataset (an expert added or removed) does not
    rerun the study: its chosen values stand. The backbone's study reruns only when the backbone does
    (backbone_reruns): its values are the backbone's alone. A rerun of a study it runs after still
    reruns it.
    """
    study = studies.get(wildcards.study)
    inputs = list(rules.dataset.output)
    if study.trainer == "router":
        inputs += router_encoder_inputs(wildcards)
    rerun = config["tuning"]["rerun_on_dataset_change"]
    if study.trainer == "backbone":
        rerun = rerun and backbone_reruns()
    inputs = on_dataset_change(inputs, rerun)
    inputs += [str(L.tuned(s)) for s in study.after]
    return inputs


def backbone_reruns():
    """Whether a rebuilt dataset retrains the backbone classifier: when backbone.rerun_on_dataset_change
    says so, or when the router is fine-tuned from it (finetune)."""
    finetuned = config["router"]["encoder_mode"] == "finetune"
    return config["backbone"]["rerun_on_dataset_change"] or finetuned


def backbone_dataset_inputs(wildcards):
    """The dataset the backbone classifier trains on (a rebuilt one retrains it if backbone_reruns())."""
    return on_dataset_change(rules.dataset.output, backbone_reruns())


def tuned_inputs(trainer):
    """The chosen values of every study whose trials run ``trainer`` (its rule waits for them)."""
    return [str(L.tuned(s)) for s in studies.trained_by(trainer)]


SINGLE_OBJECTIVE = "|".join(s.name for s in studies.STUDIES if not s.pareto)
PARETO = [s.name for s in studies.STUDIES if s.pareto]


def dataset_kb_inputs(wildcards):
    """The KB stages' outputs the dataset stage also reads: chunks (windows, the retrieval index) and
    clusters (a window's context)."""
    if config["dataset"]["labelled_csv"]:
        return []
    return [str(L.kb(e)) for e in EXPERTS] + [str(L.clusters(e)) for e in EXPERTS]


def router_encoder_inputs(wildcards):
    """What the router's encoder comes from: the fine-tuned backbone (finetune) or the frozen encoder's
    cached states (frozen; lpft needs both the states and nothing of the backbone)."""
    if config["router"]["encoder_mode"] == "finetune":
        return list(rules.train_backbone.output)
    return list(rules.states.output)


def all_queries(wildcards):
    if config["dataset"]["labelled_csv"]:
        return [config["dataset"]["labelled_csv"]]
    return [str(L.queries(e)) for e in EXPERTS]


def evaluate_inputs(wildcards):
    """The real questions scored beside the test split (with the training split their TF-IDF baseline
    is fitted on), the off-topic questions the abstain rates are measured on, and the KB index
    retrieval routing reads.

    The dataset stage writes the index only when the KB stages ran (no dataset.labelled_csv).
    """
    inputs = list(config["evaluate"]["off_topic_questions"])
    if config["evaluate"]["real_questions"]:
        inputs += [config["evaluate"]["real_questions"], str(L.split("train"))]
    if not config["dataset"]["labelled_csv"]:
        inputs.append(str(L.kb_index))
    return inputs


def final_outputs():
    outs = []
    # a user's own labelled questions skip the KB stages
    if not config["dataset"]["labelled_csv"]:
        for e in EXPERTS:
            outs += [str(L.cluster_summary(e)), str(L.cluster_plot(e))]
    outs += [str(L.router / "model.safetensors"), str(L.router / "metrics.json")]
    outs += [str(L.pareto(s, "csv")) for s in PARETO]
    return outs


# -- Slurm (slurm_profile/): what a retried job asks for ------------------------------------------


def per_attempt(base):
    """A resource callable: ``base`` on attempt 1, ``n * base`` on attempt n (after OOM or a time limit)."""

    def scaled(wildcards, attempt):
        return base * attempt

    return scaled
