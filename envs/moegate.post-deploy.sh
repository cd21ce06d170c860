#!/usr/bin/env bash
# Run by Snakemake inside the new conda env right after it is built (--software-deployment-method conda),
# from the directory snakemake was started in: the checkout. The env then has the `moegate` command
# that every rule calls. Set MOEGATE_SOURCE when snakemake runs elsewhere (--directory).
set -euo pipefail
python -m pip install --no-deps -e "${MOEGATE_SOURCE:-.}"
