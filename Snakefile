# moegate: build the gate of a Mixture of RAG experts from the experts' knowledge bases.
#   snakemake --cores 2                                   # the embedded demo, on this machine
#   snakemake --workflow-profile slurm_profile            # every heavy rule as a Slurm job
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


# run from a checkout without installing
sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from moegate.config import check_secrets, rename_deprecated

# a secret in the config stops the run before anything is written, and before validate() could quote it
check_secrets(config, source="snakemake config")
# renamed keys (router.lambda_ -> router.ponder_cost) read under their new names, with a warning
rename_deprecated(config, source="snakemake config")
# the package ships this same schema file
validate(config, schema="src/moegate/config.schema.yaml")


include: "rules/common.smk"


wildcard_constraints:
    expert="|".join(EXPERTS),
    study="|".join(STUDIES),
    worker=r"\d+",


# synthesize may call a hosted LLM API that compute nodes cannot reach; the rest are seconds of work
localrules:
    all,
    synthesize,
    tune_create,
    tune_collect,
    tune_lambda_collect,


include: "rules/ingest.smk"
include: "rules/cluster.smk"
include: "rules/synthesize.smk"
include: "rules/dataset.smk"
include: "rules/states.smk"
include: "rules/train_backbone.smk"
include: "rules/tune.smk"
include: "rules/train_router.smk"
include: "rules/evaluate.smk"


rule all:
    input:
        final_outputs(),
