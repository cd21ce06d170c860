rule dataset:
    input:
        all_queries,
        dataset_kb_inputs,
    output:
        train=str(L.split("train")),
        val=str(L.split("val")),
        test=str(L.split("test")),
        labels=str(L.labels),
        report=str(L.dataset_report),
        tokens=expand(str(L.tokens("{split}")), split=["train", "val", "test"]),
        # the KB chunks in the encoder's space (retrieval routing, its teacher): only when the KB stages ran
        kb_index=[] if config["dataset"]["labelled_csv"] else [str(L.kb_index)],
    log:
        str(L.logs / "dataset.log"),
    benchmark:
        str(L.logs / "dataset.benchmark.tsv")
    conda:
        "../envs/moegate.yaml"
    resources:
        cpus_per_task=1,
        mem_mb=per_attempt(4000),
        runtime=per_attempt(15),
    params:
        config=CONFIG,
    shell:
        "moegate dataset --config {params.config:q} 2> {log:q}"
