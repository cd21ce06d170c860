rule evaluate:
    input:
        rules.train_router.output,
        rules.train_backbone.output,
        str(L.split("test")),
        str(L.tokens("test")),
        str(L.labels),
        evaluate_inputs,
    output:
        metrics=str(L.router / "metrics.json"),
        exit_layers=report(
            str(L.evaluation / "exit_layers.png"),
            caption="../workflow/report/exit_layers.rst",
            category="Router",
        ),
        confusion=report(
            str(L.evaluation / "confusion.png"),
            caption="../workflow/report/confusion.rst",
            category="Router",
        ),
    log:
        str(L.logs / "evaluate.log"),
    benchmark:
        str(L.logs / "evaluate.benchmark.tsv")
    conda:
        "../envs/moegate.yaml"
    threads: 4  # torch's intra-op threads (OMP_NUM_THREADS); capped by --cores locally
    resources:
        cpus_per_task=4,
        mem_mb=per_attempt(16000),
        runtime=per_attempt(30),
    params:
        config=CONFIG,
    shell:
        "moegate evaluate --config {params.config:q} 2> {log:q}"
