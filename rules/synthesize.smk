# Questions per context of each expert's clusters. A localrule (the Snakefile): the openai backend
# may call a hosted API that compute nodes cannot reach, and the offline backend is seconds of work.
# Raw LLM replies are cached under results/cache/llm (not an output, so a failed job keeps them):
# a rerun pays only for the contexts that got no reply.


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
    conda:
        "../envs/moegate.yaml"
    params:
        config=CONFIG,
    shell:
        "moegate synthesize --config {params.config:q} --expert {wildcards.expert} 2> {log:q}"
