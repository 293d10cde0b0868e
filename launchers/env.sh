# launchers/env.sh — the one place for the environment of multi-GPU and multi-node runs.
#
# Every launcher sources this file (pretrain.sh, retrieval.sh, slurm_pretrain.sbatch). Set a knob
# here, or export it in your shell / job script before launching; a knob left unset keeps NCCL's
# or PyTorch's default. The launchers forward every knob listed in MMTRAIN_ENV_VARS to all nodes
# (the DeepSpeed runner through a DS_ENV_FILE, srun and torchrun through the environment).
#
#   NCCL_SOCKET_IFNAME    interface(s) NCCL uses to reach other nodes, e.g. eth0 or ^lo,docker0
#                         (set it when nodes have several NICs and NCCL picks the wrong one)
#   NCCL_IB_DISABLE       1 = no InfiniBand / RoCE (Ethernet-only clusters, or to rule IB out)
#   NCCL_IB_HCA           which IB adapters NCCL may use, e.g. mlx5_0,mlx5_1
#   NCCL_NET_GDR_LEVEL    how close a NIC must be to a GPU for GPUDirect RDMA (e.g. PHB)
#   NCCL_P2P_DISABLE      1 = no NVLink / PCIe peer-to-peer inside a node (debugging hangs)
#   NCCL_DEBUG            INFO prints NCCL's topology and transport choices (WARN is quiet)
#   NCCL_DEBUG_SUBSYS     e.g. INIT,NET with NCCL_DEBUG=INFO
#   GLOO_SOCKET_IFNAME    the interface gloo uses (CPU runs, and torch's CPU-side collectives)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING  1/3 = a failed or hung collective ends the job instead of
#                         hanging the other ranks (PyTorch default: 3)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT   seconds torchrun waits, after forwarding a stop signal, for
#                         the workers to write their checkpoint and exit before it kills them
#   OMP_NUM_THREADS       CPU threads per process (torchrun sets 1 when it is unset)

MMTRAIN_ENV_VARS=(
    NCCL_SOCKET_IFNAME NCCL_IB_DISABLE NCCL_IB_HCA NCCL_NET_GDR_LEVEL NCCL_P2P_DISABLE
    NCCL_DEBUG NCCL_DEBUG_SUBSYS GLOO_SOCKET_IFNAME TORCH_NCCL_ASYNC_ERROR_HANDLING
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT OMP_NUM_THREADS
)

# Edit for your cluster (examples):
# export NCCL_SOCKET_IFNAME=eth0
# export GLOO_SOCKET_IFNAME=eth0
# export NCCL_IB_DISABLE=1
# export NCCL_DEBUG=WARN

# A checkpoint of a large model takes longer than torchrun's default 30 s grace period.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}"
