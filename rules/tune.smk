# Each study (moegate.studies): N worker jobs share one Optuna study (storage from config), then a cheap
# collect rule writes the chosen values to tuning/{study}.json, where the next stage reads them.


# The study is created once before its workers start: N workers creating Optuna's tables on an empty
# PostgreSQL at the same moment crash (workers also retry that race, as a safety net).
rule tune_create:
    output:
        touch(str(L.tuning / "{study}" / "study.created")),
    log:
        str(L.logs / "tune" / "{study}.create.log"),
    conda:
        "../envs/moegate.yaml"
    params:
        config=CONFIG,
    shell:
        "moegate tune create {wildcards.study} --config {params.config:q} 2> {log:q}"


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
    conda:
        "../envs/moegate.yaml"
    resources:
        cpus_per_task=4,
        mem_mb=per_attempt(16000),
        runtime=per_attempt(240),
    params:
        config=CONFIG,
    shell:
        "moegate tune worker {wildcards.study} --index {wildcards.worker} --config {params.config:q} 2> {log:q}"


rule tune_collect:
    input:
        expand(str(L.worker_done("{{study}}", "{worker}")), worker=WORKERS),
    output:
        str(L.tuned("{study}")),
    log:
        str(L.logs / "tune" / "{study}.collect.log"),
    wildcard_constraints:
        study=SINGLE_OBJECTIVE,
    conda:
        "../envs/moegate.yaml"
    params:
        config=CONFIG,
    shell:
        "moegate tune collect {wildcards.study} --config {params.config:q} 2> {log:q}"


# the two-objective λ study (studies.Study.pareto) also writes its Pareto table and plot
rule tune_lambda_collect:
    input:
        expand(str(L.worker_done("lambda", "{worker}")), worker=WORKERS),
    output:
        chosen=str(L.tuned("lambda")),
        pareto=str(L.pareto("lambda", "csv")),
        plot=report(
            str(L.pareto("lambda", "png")),
            caption="../workflow/report/pareto.rst",
            category="Tuning",
        ),
    log:
        str(L.logs / "tune" / "lambda.collect.log"),
    conda:
        "../envs/moegate.yaml"
    params:
        config=CONFIG,
    shell:
        "moegate tune collect lambda --config {params.config:q} 2> {log:q}"
