#!/usr/bin/env bash
# Serve TensorBoard for a runs directory, on 127.0.0.1 (this machine only) unless told otherwise.
set -euo pipefail
MMTRAIN_PROG="tensorboard.sh"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<USAGE
Usage: launchers/tensorboard.sh [--port P] [--host ADDR] [--dry-run] [runs_dir] [-- tensorboard args]

Serves TensorBoard for every run under runs_dir (default: runs) at http://127.0.0.1:6006.
  --port P       port (default 6006)
  --host ADDR    address to listen on (default 127.0.0.1: only this machine). Anything else
                 (e.g. 0.0.0.0) shows your runs to everyone who can reach that address; from
                 another machine prefer an ssh tunnel: ssh -L 6006:127.0.0.1:6006 <this host>
                 (TensorBoard's own --bind_all or --host after -- get the same warning)
  --dry-run      print the command instead of running it (also: MMTRAIN_DRY_RUN=1)
  -h, --help     show this help
USAGE
}

runs_dir="" host="127.0.0.1" port="6006"
MMTRAIN_DRY_RUN="${MMTRAIN_DRY_RUN:-0}"
extra=()
while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --dry-run | --dry_run) MMTRAIN_DRY_RUN=1 ;;
        --port) (($# >= 2)) || mmtrain_die "--port needs a value"; port="$2"; shift ;;
        --port=*) port="${1#*=}" ;;
        --host) (($# >= 2)) || mmtrain_die "--host needs a value"; host="$2"; shift ;;
        --host=*) host="${1#*=}" ;;
        --) shift; extra+=("$@"); break ;;
        -*) mmtrain_die "unknown option $1 (see --help; pass TensorBoard's own options after --)" ;;
        *) [[ -z "$runs_dir" ]] || mmtrain_die "one runs_dir only (got '$runs_dir' and '$1')"; runs_dir="$1" ;;
    esac
    shift
done
runs_dir="${runs_dir:-runs}"
[[ "$MMTRAIN_DRY_RUN" == 1 || -d "$runs_dir" ]] || mmtrain_die "no runs directory '$runs_dir' (train something first, or pass its path)"

is_loopback() {  # 127.0.0.0/8, localhost, ::1
    case "$1" in
        127.* | localhost | ::1 | "[::1]" | 0:0:0:0:0:0:0:1) return 0 ;;
        *) return 1 ;;
    esac
}

warn_exposed() {
    echo "tensorboard.sh: warning: listening on $1, not only on this machine: anyone who can reach it sees these runs" >&2
}

is_loopback "$host" || warn_exposed "$host"
# TensorBoard's own options after -- can widen the binding too: a later --host wins over ours, and
# --bind_all (which TensorBoard refuses beside any --host) replaces ours.
host_args=(--host "$host")
for ((i = 0; i < ${#extra[@]}; i++)); do
    case "${extra[i]}" in
        --bind_all | -bind_all | --bind_all=true | --bind_all=1 | -bind_all=true)
            host_args=()
            warn_exposed "every interface (--bind_all)" ;;
        --host | -host) ((i + 1 < ${#extra[@]})) && { is_loopback "${extra[i + 1]}" || warn_exposed "${extra[i + 1]}"; } ;;
        --host=* | -host=*) is_loopback "${extra[i]#*=}" || warn_exposed "${extra[i]#*=}" ;;
    esac
done
MMTRAIN_CMD=(tensorboard --logdir "$runs_dir" "${host_args[@]}" --port "$port" "${extra[@]}")
mmtrain_exec
