rule ingest:
    input:
        ingest_inputs,
    output:
        kb=str(L.kb("{expert}")),
        report=str(L.kb_report("{expert}")),
    log:
        str(L.logs / "ingest" / "{expert}.log"),
    benchmark:
        str(L.logs / "ingest" / "{expert}.benchmark.tsv")
    conda:
        "../envs/moegate.yaml"
    resources:
        cpus_per_task=2,
        mem_mb=per_attempt(8000),
        runtime=per_attempt(60),
    params:
        config=CONFIG,
    shell:
        "moegate ingest --config {params.config:q} --expert {wildcards.expert} 2> {log:q}"
