# Each study: N worker jobs share one Optuna study (storage from config), then a cheap collect rule
# writes the chosen values to tuning/{study}.json, where the next stage reads them.


def tune_inputs(wildcards):
    inputs = list(rules.dataset.output)
    if wildcards.study != "backbone":
        inputs += rules.train_backbone.output
    before = {
        "submodels": [],
        "training": ["submodels"],
        "lambda": ["submodels", "training"],
    }
    inputs += [str(L.tuned(s)) for s in before.get(wildcards.study, [])]
    return inputs


# The study is created once before its workers start: N workers creating Optuna's tables on an empty
# PostgreSQL at the same moment crash (workers also retry that race, as a safety net).
rule tune_create:
    output:
        touch(str(L.tuning / "{study}" / "study.created")),
    log:
        str(L.logs / "tune" / "{study}.create.log"),
    localrule: True
    shell:
        "moegate tune {wildcards.study} --config {CONFIG:q} --create 2> {log:q}"


rule tune_worker:
    input:
        tune_inputs,
        str(L.tuning / "{study}" / "study.created"),
    output:
        touch(str(L.worker_done("{study}", "{worker}"))),
    log:
        str(L.logs / "tune" / "{study}.worker{worker}.log"),
    benchmark:
        str(L.logs / "tune" / "{study}.worker{worker}.benchmark.tsv")
    resources:
        cpus_per_task=4,
        mem_mb=per_attempt(16000),
        runtime=per_attempt(240),
    shell:
        "moegate tune {wildcards.study} --config {CONFIG:q} --worker {wildcards.worker} 2> {log:q}"


rule tune_collect:
    input:
        expand(str(L.worker_done("{{study}}", "{worker}")), worker=WORKERS),
    output:
        str(L.tuned("{study}")),
    log:
        str(L.logs / "tune" / "{study}.collect.log"),
    wildcard_constraints:
        study="backbone|submodels|training",
    shell:
        "moegate tune {wildcards.study} --config {CONFIG:q} --collect 2> {log:q}"


rule tune_lambda_collect:
    input:
        expand(str(L.worker_done("lambda", "{worker}")), worker=WORKERS),
    output:
        chosen=str(L.tuned("lambda")),
        pareto=str(L.tuning / "lambda_pareto.csv"),
        plot=report(
            str(L.tuning / "lambda_pareto.png"),
            caption="../workflow/report/pareto.rst",
            category="Tuning",
        ),
    log:
        str(L.logs / "tune" / "lambda.collect.log"),
    shell:
        "moegate tune lambda --config {CONFIG:q} --collect 2> {log:q}"
