# launchers/common.sh — the launch logic shared by pretrain.sh and retrieval.sh (sourced, not run).
#
#   mmtrain_launch <entry script, relative to the repository root> [launcher options] [script args]
#
# parses the launcher options, builds one command — deepspeed or torchrun, on one node, on the
# nodes of a hostfile, or as one node of a torchrun rendezvous — and execs it. With --dry-run or
# MMTRAIN_DRY_RUN=1 it prints that exact command instead (tests and the README use this). Every
# argument that is not a launcher option goes to the entry script unchanged, in order.

MMTRAIN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=env.sh
source "$MMTRAIN_ROOT/launchers/env.sh"

# Signals torchrun forwards to the workers. SIGUSR1 is not in torchrun's default list; SLURM sends it
# before the time limit. The workers checkpoint at the next step and exit 75 on SIGTERM / SIGUSR1.
MMTRAIN_TORCHRUN_SIGNALS="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
MMTRAIN_EXIT_PREEMPTED=75

mmtrain_die() {
    echo "${MMTRAIN_PROG:-mmtrain}: $*" >&2
    exit 2
}

# Print a command the way a shell would read it back (one line, arguments quoted where needed).
mmtrain_print() {
    local out="" arg
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
            out+="$arg "
        else
            out+="$(printf '%q' "$arg") "
        fi
    done
    echo "${out% }"
}

# The entry script as the command line names it: relative when launched from the repository root
# (the README's commands), absolute otherwise.
mmtrain_entry_path() {
    if [[ "$PWD" == "$MMTRAIN_ROOT" ]]; then
        echo "$1"
    else
        echo "$MMTRAIN_ROOT/$1"
    fi
}

# GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists, else 0.
mmtrain_gpu_count() {
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo 0
        return
    fi
    if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
        if [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == "-1" ]]; then
            echo 0
        else
            local ids
            IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
            echo "${#ids[@]}"
        fi
        return
    fi
    local n
    n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
    echo "${n:-0}"
}

# The knobs of env.sh that are set, as NAME=value lines.
mmtrain_env_knobs() {
    local name
    for name in "${MMTRAIN_ENV_VARS[@]}"; do
        if [[ -n "${!name+x}" ]]; then
            echo "$name=${!name}"
        fi
    done
}

# The DeepSpeed runner reaches the other nodes over ssh and forwards only some variables (NCCL_*,
# PYTHON*, ...). Hand it every knob of env.sh through DS_ENV_FILE (unless the user set their own).
mmtrain_deepspeed_env_file() {
    local knobs
    knobs="$(mmtrain_env_knobs | grep -v '^TORCH_ELASTIC_' || true)"  # torchrun-only knobs stay home
    [[ -n "$knobs" && -z "${DS_ENV_FILE:-}" ]] || return 0
    if [[ "$MMTRAIN_DRY_RUN" == 1 ]]; then
        echo "# forwarded to every node (DS_ENV_FILE): ${knobs//$'\n'/ }" >&2
        return 0
    fi
    local dir="${XDG_CACHE_HOME:-$HOME/.cache}/mmtrain" tmp
    mkdir -p "$dir"
    tmp="$(mktemp "$dir/deepspeed_env.XXXXXX")"
    printf '%s\n' "$knobs" >"$tmp"
    mv -f "$tmp" "$dir/deepspeed_env"
    export DS_ENV_FILE="$dir/deepspeed_env"  # absolute: DeepSpeed joins it to ~ and . unchanged
}

mmtrain_launcher_usage() {
    local prog="launchers/$MMTRAIN_PROG" entry="$1"
    cat <<EOF
Usage: $prog [launcher options] [--config X.yaml ...] [key=value ...]

Starts $entry on this machine or on several. Every argument that is not a launcher
option (--config files, key=value overrides) is passed to $entry unchanged.

One node (the default):
  deepspeed --num_gpus <GPUs> on a machine with GPUs, torchrun --standalone on CPU.
  --nproc N             processes on this node (default: all visible GPUs, or 1 on CPU)
  --runner R            deepspeed | torchrun, to override that choice
  --master_port P       fixed port (default: deepspeed 29500, torchrun --standalone a free one)

Several nodes with the DeepSpeed runner (started from one node over ssh/pdsh):
  --hostfile FILE       "<host> slots=<GPUs>" per line; see launchers/hostfile.example
  --num_nodes N         use the first N hosts of the hostfile
  --master_addr ADDR    address of the first host as the other nodes reach it
  --master_port P       rendezvous port on the first host

Several nodes with torchrun (run the same command on every node):
  --nnodes N            number of nodes
  --rdzv_endpoint H:P   c10d rendezvous hosted at H:P (H = one of the nodes, usually the first)
  --rdzv_id ID          rendezvous id shared by the nodes of one job (default: mmtrain)
  --node_rank R         static rendezvous instead of c10d: this node's rank (0..N-1), with
                        --master_addr/--master_port of node 0
  --max_restarts N      restart the workers up to N times after a failure; they resume from
                        the latest checkpoint (checkpoint.resume=auto, the default)

Other:
  --dry-run             print the command instead of running it (also: MMTRAIN_DRY_RUN=1)
  -h, --help            show this help

Network knobs (NCCL_SOCKET_IFNAME, NCCL_IB_DISABLE, GLOO_SOCKET_IFNAME, ...): launchers/env.sh.
SIGTERM / SIGUSR1 make the run write a checkpoint at the next step and exit $MMTRAIN_EXIT_PREEMPTED; relaunching
the same command continues from it. SLURM: launchers/slurm_pretrain.sbatch.

Examples (from the repository root):
  $prog --config configs/pretrain/tiny.yaml train.steps=50
  $prog --nproc 8 --config configs/pretrain/mixer-d512-ctx512.yaml
  $prog --hostfile launchers/hostfile.example --master_addr 10.0.0.1 --master_port 29500 \\
      --config configs/pretrain/mixer-d512-ctx512.yaml
  $prog --nnodes 2 --nproc 8 --rdzv_endpoint 10.0.0.1:29400 --rdzv_id run1 \\
      --config configs/pretrain/mixer-d512-ctx512.yaml
EOF
}

mmtrain_launch() {
    local entry_rel="$1"
    shift
    local nproc="" runner="" hostfile="" num_nodes="" master_addr="" master_port=""
    local nnodes="" node_rank="" rdzv_endpoint="" rdzv_id="" max_restarts=""
    local -a script_args=()
    MMTRAIN_DRY_RUN="${MMTRAIN_DRY_RUN:-0}"

    while (($#)); do
        local arg="$1" opt value has_value=0
        if [[ "$arg" == --*=* ]]; then
            opt="${arg%%=*}"
            value="${arg#*=}"
            has_value=1
        else
            opt="$arg"
        fi
        if [[ "$opt" == --?* ]]; then  # --master-addr and --master_addr are the same option
            local body="${opt#--}"
            opt="--${body//-/_}"
        fi
        case "$opt" in
            -h | --help)
                mmtrain_launcher_usage "$entry_rel"
                exit 0
                ;;
            --dry_run)
                MMTRAIN_DRY_RUN=1
                shift
                continue
                ;;
            --)
                shift
                script_args+=("$@")
                break
                ;;
            --nproc | --nproc_per_node | --runner | --hostfile | --num_nodes | --master_addr | --master_port | \
                --nnodes | --node_rank | --rdzv_endpoint | --rdzv_id | --max_restarts)
                if ((!has_value)); then
                    (($# >= 2)) || mmtrain_die "$opt needs a value (see --help)"
                    value="$2"
                    shift
                fi
                shift
                case "$opt" in
                    --nproc | --nproc_per_node) nproc="$value" ;;
                    --runner) runner="$value" ;;
                    --hostfile) hostfile="$value" ;;
                    --num_nodes) num_nodes="$value" ;;
                    --master_addr) master_addr="$value" ;;
                    --master_port) master_port="$value" ;;
                    --nnodes) nnodes="$value" ;;
                    --node_rank) node_rank="$value" ;;
                    --rdzv_endpoint) rdzv_endpoint="$value" ;;
                    --rdzv_id) rdzv_id="$value" ;;
                    --max_restarts) max_restarts="$value" ;;
                esac
                continue
                ;;
        esac
        script_args+=("$arg")
        shift
    done

    local entry gpus
    entry="$(mmtrain_entry_path "$entry_rel")"
    gpus="$(mmtrain_gpu_count)"
    [[ -z "$runner" || "$runner" == deepspeed || "$runner" == torchrun ]] ||
        mmtrain_die "--runner must be deepspeed or torchrun, got '$runner'"
    [[ -z "$hostfile" || -z "$nnodes" ]] ||
        mmtrain_die "--hostfile (DeepSpeed runner) and --nnodes (torchrun) are two ways to go multi-node: pick one"
    if [[ -z "$nnodes" && -n "$node_rank$rdzv_endpoint$rdzv_id" ]]; then
        mmtrain_die "--node_rank / --rdzv_endpoint / --rdzv_id belong to a torchrun multi-node launch: add --nnodes N"
    fi
    [[ -z "$num_nodes" || -n "$hostfile" ]] || mmtrain_die "--num_nodes selects hosts of a --hostfile (torchrun: --nnodes)"
    [[ -z "$master_addr" || -n "$hostfile" || -n "$node_rank" ]] ||
        mmtrain_die "--master_addr is for --hostfile or --nnodes with --node_rank (one node uses 127.0.0.1)"
    if [[ -n "$max_restarts" && ( -n "$hostfile" || "$runner" == deepspeed ) ]]; then
        mmtrain_die "--max_restarts is a torchrun option (the DeepSpeed runner does not restart workers)"
    fi
    if [[ -n "$hostfile" && "$MMTRAIN_DRY_RUN" != 1 && ! -r "$hostfile" ]]; then
        mmtrain_die "hostfile '$hostfile' not found (see launchers/hostfile.example)"
    fi
    MMTRAIN_CMD=()

    if [[ -n "$hostfile" ]]; then
        # Several nodes, DeepSpeed runner: it ssh-es into every host of the hostfile.
        [[ "$runner" != torchrun ]] || mmtrain_die "--hostfile uses the DeepSpeed runner; for torchrun use --nnodes"
        MMTRAIN_CMD=(deepspeed --hostfile "$hostfile")
        [[ -z "$num_nodes" ]] || MMTRAIN_CMD+=(--num_nodes "$num_nodes")
        [[ -z "$nproc" ]] || MMTRAIN_CMD+=(--num_gpus "$nproc")
        [[ -z "$master_addr" ]] || MMTRAIN_CMD+=(--master_addr "$master_addr")
        [[ -z "$master_port" ]] || MMTRAIN_CMD+=(--master_port "$master_port")
        mmtrain_deepspeed_env_file
    elif [[ -n "$nnodes" ]]; then
        # One node of a torchrun job: the same command runs on every node.
        [[ "$runner" != deepspeed ]] || mmtrain_die "--nnodes uses torchrun; for the DeepSpeed runner use --hostfile"
        [[ -n "$nproc" ]] || nproc=$((gpus > 0 ? gpus : 1))
        MMTRAIN_CMD=(torchrun --nnodes "$nnodes" --nproc_per_node "$nproc")
        if [[ -n "$rdzv_endpoint" ]]; then
            [[ -z "$node_rank" ]] || mmtrain_die "give --rdzv_endpoint (c10d, ranks assigned on arrival) or --node_rank (static), not both"
            MMTRAIN_CMD+=(--rdzv_backend c10d --rdzv_endpoint "$rdzv_endpoint" --rdzv_id "${rdzv_id:-mmtrain}")
        elif [[ -n "$node_rank" ]]; then
            [[ -n "$master_addr" ]] || mmtrain_die "--node_rank needs --master_addr (the address of node 0)"
            MMTRAIN_CMD+=(--node_rank "$node_rank" --master_addr "$master_addr" --master_port "${master_port:-29500}")
        else
            mmtrain_die "--nnodes needs --rdzv_endpoint HOST:PORT (c10d) or --node_rank R with --master_addr"
        fi
        [[ -z "$max_restarts" ]] || MMTRAIN_CMD+=(--max_restarts "$max_restarts")
        MMTRAIN_CMD+=(--signals_to_handle "$MMTRAIN_TORCHRUN_SIGNALS")
    else
        # One node.
        [[ -n "$runner" ]] || runner=$([[ "$gpus" -gt 0 && -z "$max_restarts" ]] && echo deepspeed || echo torchrun)
        if [[ "$runner" == deepspeed ]]; then
            MMTRAIN_CMD=(deepspeed)
            if [[ -n "$nproc" ]]; then
                MMTRAIN_CMD+=(--num_gpus "$nproc")
            elif [[ -z "${CUDA_VISIBLE_DEVICES:-}" ]]; then  # with it set, deepspeed uses exactly those
                MMTRAIN_CMD+=(--num_gpus "$((gpus > 0 ? gpus : 1))")
            fi
            [[ -z "$master_port" ]] || MMTRAIN_CMD+=(--master_port "$master_port")
        else
            [[ -n "$nproc" ]] || nproc=$((gpus > 0 ? gpus : 1))
            MMTRAIN_CMD=(torchrun)
            if [[ -n "$master_port" ]]; then
                MMTRAIN_CMD+=(--master_addr 127.0.0.1 --master_port "$master_port")
            else
                MMTRAIN_CMD+=(--standalone)
            fi
            MMTRAIN_CMD+=(--nproc_per_node "$nproc")
            [[ -z "$max_restarts" ]] || MMTRAIN_CMD+=(--max_restarts "$max_restarts")
            MMTRAIN_CMD+=(--signals_to_handle "$MMTRAIN_TORCHRUN_SIGNALS")
        fi
    fi
    MMTRAIN_CMD+=("$entry" "${script_args[@]}")
    MMTRAIN_ENTRY="$entry"
    mmtrain_exec
}

# Print (dry run) or exec MMTRAIN_CMD.
mmtrain_exec() {
    if [[ "${MMTRAIN_DRY_RUN:-0}" == 1 ]]; then
        mmtrain_print "${MMTRAIN_CMD[@]}"
        exit 0
    fi
    command -v "${MMTRAIN_CMD[0]}" >/dev/null 2>&1 ||
        mmtrain_die "'${MMTRAIN_CMD[0]}' is not on PATH: activate mmtrain's environment first (. .venv/bin/activate)"
    if [[ -n "${MMTRAIN_ENTRY:-}" && ! -f "$MMTRAIN_ENTRY" ]]; then
        mmtrain_die "$MMTRAIN_ENTRY does not exist in this checkout"
    fi
    exec "${MMTRAIN_CMD[@]}"
}
