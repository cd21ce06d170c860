rule train_router:
    input:
        rules.dataset.output,
        router_encoder_inputs,
        tuned_inputs("router"),
    output:
        model=str(L.router / "model.safetensors"),
        config=str(L.router / "config.json"),
        training=str(L.router / "training.json"),
    log:
        str(L.logs / "train_router.log"),
    benchmark:
        str(L.logs / "train_router.benchmark.tsv")
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
        "moegate train-router --config {params.config:q} 2> {log:q}"
