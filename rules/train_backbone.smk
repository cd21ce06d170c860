rule train_backbone:
    input:
        backbone_dataset_inputs,
        tuned_inputs("backbone"),
    output:
        model=str(L.backbone / "model.safetensors"),
        metrics=str(L.backbone / "metrics.json"),
    log:
        str(L.logs / "train_backbone.log"),
    benchmark:
        str(L.logs / "train_backbone.benchmark.tsv")
    conda:
        "../envs/moegate.yaml"
    threads: 4  # torch's intra-op threads (OMP_NUM_THREADS); capped by --cores locally
    resources:
        cpus_per_task=4,
        mem_mb=per_attempt(16000),
        runtime=per_attempt(120),
    params:
        config=CONFIG,
    shell:
        "moegate train-backbone --config {params.config:q} 2> {log:q}"
