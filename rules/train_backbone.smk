rule train_backbone:
    input:
        rules.dataset.output,
        str(L.tuned("backbone")),
    output:
        model=str(L.backbone / "model.safetensors"),
        metrics=str(L.backbone / "metrics.json"),
    log:
        str(L.logs / "train_backbone.log"),
    benchmark:
        str(L.logs / "train_backbone.benchmark.tsv")
    shell:
        "moegate train-backbone --config {CONFIG:q} 2> {log:q}"
