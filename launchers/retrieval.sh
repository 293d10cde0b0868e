#!/usr/bin/env bash
# Launch contrastive retrieval training (mmtrain/retrieval.py) on one machine or several: see --help.
#
#   launchers/retrieval.sh --config configs/retrieval/X.yaml [key=value ...]
#
# Same options and behaviour as pretrain.sh (the logic is shared in common.sh).
set -euo pipefail
MMTRAIN_PROG="retrieval.sh"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
mmtrain_launch mmtrain/retrieval.py "$@"
