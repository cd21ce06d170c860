# The frozen encoder's per-layer pooled states of every dataset row, once: the DACT units of a frozen
# (or lpft) router train on this cache, so an epoch and a tuning trial cost seconds.


rule states:
    input:
        str(L.labels),
        expand(str(L.tokens("{split}")), split=["train", "val", "test"]),
    output:
        states=expand(str(L.state_file("{split}")), split=["train", "val", "test"]),
        report=str(L.states / "report.json"),
    log:
        str(L.logs / "states.log"),
    benchmark:
        str(L.logs / "states.benchmark.tsv")
    conda:
        "../envs/moegate.yaml"
    threads: 4  # torch's intra-op threads (OMP_NUM_THREADS); capped by --cores locally
    resources:
        cpus_per_task=4,
        mem_mb=per_attempt(16000),
        runtime=per_attempt(60),
    params:
        config=CONFIG,
    shell:
        "moegate states --config {params.config:q} 2> {log:q}"
