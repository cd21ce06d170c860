def ingest_inputs(wildcards):
    """The expert's vector export, or every document its folder holds (so an edited page reruns ingest)."""
    from moegate.ingest import find_documents

    source = Path(expert_source(wildcards))
    if source.is_dir():
        documents, _ = find_documents(source, config["ingest"]["exclude"])
        return [str(path) for path in documents] or [str(source)]
    return [str(source)]


rule ingest:
    input:
        ingest_inputs,
    output:
        kb=str(L.kb("{expert}")),
        report=str(L.kb_report("{expert}")),
    log:
        str(L.logs / "ingest" / "{expert}.log"),
    benchmark:
        str(L.logs / "ingest" / "{expert}.benchmark.tsv")
    resources:
        cpus_per_task=2,
        mem_mb=per_attempt(8000),
        runtime=per_attempt(60),
    shell:
        "moegate ingest --config {CONFIG:q} --expert {wildcards.expert} 2> {log:q}"
