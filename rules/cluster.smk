rule cluster:
    input:
        str(L.kb("{expert}")),
    output:
        assignments=str(L.clusters("{expert}")),
        summary=str(L.cluster_summary("{expert}")),
        plot=report(
            str(L.cluster_plot("{expert}")),
            caption="../workflow/report/cluster.rst",
            category="Clusters",
        ),
    log:
        str(L.logs / "cluster" / "{expert}.log"),
    conda:
        "../envs/moegate.yaml"
    resources:
        cpus_per_task=2,
        mem_mb=per_attempt(8000),
        runtime=per_attempt(30),
    params:
        config=CONFIG,
    shell:
        "moegate cluster --config {params.config:q} --expert {wildcards.expert} 2> {log:q}"
