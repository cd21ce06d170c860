rule ingest:
    input:
        expert_source,
    output:
        kb=str(L.kb("{expert}")),
        report=str(L.kb_report("{expert}")),
    log:
        str(L.logs / "ingest" / "{expert}.log"),
    benchmark:
        str(L.logs / "ingest" / "{expert}.benchmark.tsv")
    shell:
        "moegate ingest --config {CONFIG:q} --expert {wildcards.expert} 2> {log:q}"
