"""The workflow's stages: one Snakemake rule file (``rules/<stage>.smk``) and one CLI subcommand each.

In the order they run: ingest → cluster → synthesize → dataset → states → tune ⇄ {train_backbone,
train_router} → evaluate. Each reads the run config and takes its paths from :mod:`moegate.layout`. A
stage may use the library modules (``moegate.*``, :mod:`moegate.models`); a library module never imports
a stage (tests/test_architecture.py). Nothing is imported here: ``moegate ingest`` must not pull in torch.
"""
