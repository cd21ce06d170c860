rule dataset:
    input:
        all_queries,
    output:
        train=str(L.split("train")),
        val=str(L.split("val")),
        test=str(L.split("test")),
        labels=str(L.labels),
        report=str(L.dataset_report),
        tokens=expand(str(L.tokens("{split}")), split=["train", "val", "test"]),
    log:
        str(L.logs / "dataset.log"),
    shell:
        "moegate dataset --config {CONFIG:q} 2> {log:q}"
