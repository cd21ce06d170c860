rule synthesize:
    input:
        kb=str(L.kb("{expert}")),
        clusters=str(L.clusters("{expert}")),
    output:
        queries=str(L.queries("{expert}")),
        report=str(L.queries_report("{expert}")),
    log:
        str(L.logs / "synthesize" / "{expert}.log"),
    benchmark:
        str(L.logs / "synthesize" / "{expert}.benchmark.tsv")
    shell:
        "moegate synthesize --config {CONFIG:q} --expert {wildcards.expert} 2> {log:q}"
