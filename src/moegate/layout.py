"""The results layout: where every stage reads and writes inside one run's results dir.

Both the Snakemake rules (``rules/common.smk``) and the CLI take their paths from here, so a stage
run by hand writes exactly what the workflow expects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    results: Path
    # a stage that writes a whole directory writes it into a temporary sibling that io.atomic_dir then
    # swaps in; these point that stage's own directory there (see staged), every other path stays put
    dataset_dir: Path | None = None
    states_dir: Path | None = None

    @classmethod
    def from_config(cls, config: dict) -> Layout:
        return cls(Path(config.get("results", "results")))

    def staged(self, **dirs: Path) -> Layout:
        """This layout with ``dataset_dir`` / ``states_dir`` pointing at a stage's temporary directory."""
        return dataclasses.replace(self, **dirs)

    # -- data stages --------------------------------------------------------------------------
    def kb(self, expert: str) -> Path:
        return self.results / "kb" / f"{expert}.parquet"

    def kb_report(self, expert: str) -> Path:
        return self.results / "kb" / f"{expert}.report.json"

    def clusters(self, expert: str) -> Path:
        return self.results / "clusters" / f"{expert}.parquet"

    def cluster_summary(self, expert: str) -> Path:
        return self.results / "clusters" / f"{expert}.json"

    def cluster_plot(self, expert: str) -> Path:
        return self.results / "clusters" / f"{expert}.png"

    def queries(self, expert: str) -> Path:
        return self.results / "queries" / f"{expert}.parquet"

    def queries_report(self, expert: str) -> Path:
        return self.results / "queries" / f"{expert}.report.json"

    @property
    def llm_cache(self) -> Path:
        """Raw LLM replies keyed by request hash; survives failed jobs (not a rule output)."""
        return self.results / "cache" / "llm"

    # -- caches kept between runs (not rule outputs: Snakemake deletes a job's outputs before it reruns) --
    def kb_vectors_cache(self, expert: str) -> Path:
        """An expert's KB chunks embedded with ``encoder.model`` for the KB index, keyed by the KB's
        content and the encoder: adding an expert embeds only the new KB (:mod:`moegate.rowcache`)."""
        return self.kb_vectors_caches / f"{expert}.safetensors"

    @property
    def kb_vectors_caches(self) -> Path:
        """The folder of every expert's :meth:`kb_vectors_cache`."""
        return self.results / "cache" / "kb_index"

    @property
    def row_embeddings_cache(self) -> Path:
        """Every dataset row's ``encoder.model`` embedding (the retrieval teacher's queries), keyed by text."""
        return self.results / "cache" / "embeddings" / "rows.safetensors"

    def states_cache(self, name: str) -> Path:
        """The last states stage's ``states/{name}.safetensors`` (a hard link): rows whose tokens it holds
        are not run through the encoder again."""
        return self.results / "cache" / "states" / f"{name}.safetensors"

    @property
    def previous_router(self) -> Path:
        """The router the last train_router wrote (hard links), which ``router.warm_start: auto`` starts
        from: Snakemake deletes ``router/``'s files before train_router reruns."""
        return self.results / "cache" / "router"

    @property
    def dataset(self) -> Path:
        return self.dataset_dir or self.results / "dataset"

    def split(self, name: str) -> Path:
        return self.dataset / f"{name}.parquet"

    def tokens(self, name: str) -> Path:
        return self.dataset / "tokenized" / f"{name}.safetensors"

    @property
    def kb_index(self) -> Path:
        """Every expert's KB chunks in the encoder's space (retrieval routing and its teacher)."""
        return self.dataset / "kb_index.safetensors"

    @property
    def states(self) -> Path:
        """Per-layer pooled states of every dataset row under the frozen encoder (the states stage)."""
        return self.states_dir or self.results / "states"

    def state_file(self, name: str) -> Path:
        return self.states / f"{name}.safetensors"

    @property
    def labels(self) -> Path:
        return self.dataset / "labels.json"

    @property
    def dataset_report(self) -> Path:
        return self.dataset / "report.json"

    # -- model stages -------------------------------------------------------------------------
    @property
    def backbone(self) -> Path:
        return self.results / "backbone"

    @property
    def router(self) -> Path:
        return self.results / "router"

    @property
    def checkpoints(self) -> Path:
        """Resume state of training jobs; kept out of rule outputs so a failed job keeps it."""
        return self.results / "checkpoints"

    @property
    def evaluation(self) -> Path:
        return self.results / "evaluation"

    # -- tuning -------------------------------------------------------------------------------
    @property
    def tuning(self) -> Path:
        return self.results / "tuning"

    def tuned(self, study: str) -> Path:
        """A study's chosen values (the studies themselves are in :mod:`moegate.studies`)."""
        return self.tuning / f"{study}.json"

    def pareto(self, study: str, ext: str) -> Path:
        """A two-objective study's Pareto table (csv) or plot (png)."""
        return self.tuning / f"{study}_pareto.{ext}"

    def worker_done(self, study: str, worker: int | str) -> Path:
        return self.tuning / study / f"worker{worker}.done"

    @property
    def journal(self) -> Path:
        return self.tuning / "optuna.journal"

    @property
    def resolved_config(self) -> Path:
        return self.results / "config.resolved.yaml"

    @property
    def logs(self) -> Path:
        return self.results / "logs"
