#!/usr/bin/env bash
# Launch LM pretraining (mmtrain/pretrain.py) on one machine or several: see --help.
#
#   launchers/pretrain.sh --config configs/pretrain/mixer-d512-ctx512.yaml [key=value ...]
#
# The launch logic (deepspeed vs torchrun, hostfile, rendezvous, --dry-run) is in common.sh,
# shared with retrieval.sh; network knobs are in env.sh.
set -euo pipefail
MMTRAIN_PROG="pretrain.sh"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
mmtrain_launch mmtrain/pretrain.py "$@"
