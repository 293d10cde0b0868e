"""The launchers in launchers/: syntax, --help, the exact commands they run (--dry-run), and two
real multi-process runs through them: two torchrun "nodes" on this machine, and the SLURM script
under a stand-in srun / scontrol (no SLURM, no ssh needed).

The commands here are the ones docs/scaling.md (the "Scaling out" page the README links) shows; a
test checks that it still shows exactly them.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (ROOT, TINY, finish, free_port, pretrain_in_process, start_process, train_losses,
                      wait_for_step)

LAUNCHERS = ROOT / "launchers"
SCRIPTS = sorted([*LAUNCHERS.glob("*.sh"), LAUNCHERS / "slurm_pretrain.sbatch", LAUNCHERS / "prepare_parts.slurm"])
RUNNABLE = ["pretrain.sh", "retrieval.sh", "tensorboard.sh", "slurm_pretrain.sbatch", "prepare_parts.slurm"]
CONFIG = "configs/pretrain/mixer-d512-ctx512.yaml"
SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
SLURM_JOB = {"SLURM_JOB_ID": "1234", "SLURM_JOB_NAME": "mmtrain", "SLURM_NNODES": "4",
             "SLURM_JOB_NODELIST": "node[01-04]", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "32"}

# (what, launcher invocation from the repository root, GPUs on the machine, extra env, the command it runs)
COMMANDS = [
    ("cpu", "launchers/pretrain.sh --config configs/pretrain/tiny.yaml", 0, {},
     f"torchrun --standalone --nproc_per_node 1 --signals_to_handle {SIGNALS} mmtrain/pretrain.py "
     f"--config configs/pretrain/tiny.yaml"),
    ("1 gpu", f"launchers/pretrain.sh --nproc 1 --config {CONFIG}", 8, {},
     f"deepspeed --num_gpus 1 mmtrain/pretrain.py --config {CONFIG}"),
    ("8 gpus", f"launchers/pretrain.sh --config {CONFIG}", 8, {},
     f"deepspeed --num_gpus 8 mmtrain/pretrain.py --config {CONFIG}"),
    ("hostfile", f"launchers/pretrain.sh --hostfile launchers/hostfile.example --master_addr 10.0.0.1 "
                 f"--master_port 29500 --config {CONFIG}", 8, {},
     f"deepspeed --hostfile launchers/hostfile.example --master_addr 10.0.0.1 --master_port 29500 "
     f"mmtrain/pretrain.py --config {CONFIG}"),
    ("torchrun nodes", f"launchers/pretrain.sh --nnodes 2 --nproc 8 --rdzv_endpoint 10.0.0.1:29400 "
                       f"--rdzv_id run1 --config {CONFIG}", 8, {},
     f"torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint 10.0.0.1:29400 "
     f"--rdzv_id run1 --signals_to_handle {SIGNALS} mmtrain/pretrain.py --config {CONFIG}"),
    ("slurm", f"sbatch --nodes=4 launchers/slurm_pretrain.sbatch --config {CONFIG}", 8, SLURM_JOB,
     f"srun --kill-on-bad-exit=1 --nodes 4 --ntasks-per-node 1 --cpus-per-task 32 torchrun --nnodes 4 "
     f"--nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint node01:29734 --rdzv_id 1234 "
     f"--signals_to_handle {SIGNALS} mmtrain/pretrain.py --config {CONFIG} "
     f"logging.run_dir=runs/mmtrain-1234 checkpoint.resume=auto"),
]


@pytest.fixture(scope="module")
def stubs(tmp_path_factory) -> Path:
    """Stand-ins on PATH: nvidia-smi listing $FAKE_GPUS GPUs; scontrol that expands node lists
    (from $FAKE_NODES) and records `requeue` in $STUB_LOG; srun that runs its command on this node."""
    bin_dir = tmp_path_factory.mktemp("stubs")
    scripts = {
        "nvidia-smi": '[ "${FAKE_GPUS:-0}" -gt 0 ] || { echo "No devices were found"; exit 6; }\n'
                      'for i in $(seq 0 $((FAKE_GPUS - 1))); do echo "GPU $i: Fake GPU (UUID: GPU-$i)"; done\n',
        "scontrol": 'case "$1 $2" in\n'
                    '  "show hostnames") for n in ${FAKE_NODES:-node01 node02 node03 node04}; do echo $n; done ;;\n'
                    '  "requeue "*) echo "requeue $2" >> "$STUB_LOG" ;;\n'
                    '  *) exit 1 ;;\n'
                    'esac\n',
        "srun": '# one node: drop srun options (all take a value), run the command in place\n'
                'while [[ "$1" == --* ]]; do if [[ "$1" == *=* ]]; then shift; else shift 2; fi; done\n'
                'exec "$@"\n',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(0o755)
    return bin_dir


def launcher_env(stubs: Path, gpus=0, extra=None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "NCCL_", "MMTRAIN_", "CUDA_VISIBLE_DEVICES", "DS_ENV_FILE"))}
    env["PATH"] = f"{stubs}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FAKE_GPUS"] = str(gpus)
    env.update(extra or {})
    return env


def dry_run(invocation: str, stubs: Path, gpus=0, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    """Run a README-style invocation (``launchers/x.sh ...`` or ``sbatch [--opt=v ...] script ...``)
    with MMTRAIN_DRY_RUN=1; returns the completed process (the command is its stdout)."""
    argv = shlex.split(invocation)
    if argv[0] == "sbatch":  # sbatch's own options are SLURM's business (the env stands for them)
        argv = argv[1:]
        while argv[0].startswith("-"):
            argv = argv[1:]
    return subprocess.run(["bash", *argv], cwd=cwd, env=launcher_env(stubs, gpus, {"MMTRAIN_DRY_RUN": "1", **(env or {})}),
                          capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------------------------
# Syntax, help, commands
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launcher_is_valid_bash(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", RUNNABLE)
def test_launcher_help(name, stubs):
    proc = subprocess.run(["bash", str(LAUNCHERS / name), "--help"], cwd=ROOT, env=launcher_env(stubs),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--dry-run" in proc.stdout
    assert (f"launchers/{name}" in proc.stdout) or (name == "slurm_pretrain.sbatch" and
                                                     "sbatch launchers/slurm_pretrain.sbatch" in proc.stdout)


def test_prepare_parts_submits_one_part_per_array_task_then_the_merge_after_all_of_them(stubs):
    proc = subprocess.run(["bash", str(LAUNCHERS / "prepare_parts.slurm"), "--dry-run", "--input", "data/raw/*.jsonl",
                           "--out", "s3://bucket/big", "--n-ctx", "512", "--tokenizer", "tok.model"], cwd=ROOT,
                          env={**launcher_env(stubs), "MMTRAIN_PARTS": "4"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    array, merge = [line for line in proc.stdout.splitlines() if line.startswith("sbatch ")]
    assert "--array=0-3" in array and array.endswith("--out s3://bucket/big --n-ctx 512 --tokenizer tok.model")
    assert "--dependency=afterok:JOBID" in merge and merge.endswith("--merge")
    refused = subprocess.run(["bash", str(LAUNCHERS / "prepare_parts.slurm"), "--dry-run", "--part", "0/2"], cwd=ROOT,
                             env=launcher_env(stubs), capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--part is set by this script" in refused.stderr


def test_launchers_are_executable():
    for name in RUNNABLE:
        assert os.access(LAUNCHERS / name, os.X_OK), name


@pytest.mark.parametrize("what,invocation,gpus,env,expected", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_launcher_runs_the_command_the_readme_shows(what, invocation, gpus, env, expected, stubs):
    proc = dry_run(invocation, stubs, gpus, env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


def test_readme_scaling_out_section_shows_these_commands():
    doc = (ROOT / "docs" / "scaling.md").read_text()
    match = re.search(r"^# Scaling out\n(.*?)(?=^## |\Z)", doc, re.S | re.M)
    assert match is not None, "docs/scaling.md has no '# Scaling out' section"
    section = match.group(1)
    for what, invocation, _, _, expected in COMMANDS:
        assert invocation in section, f"docs/scaling.md 'Scaling out' lacks the {what} invocation: {invocation}"
        assert expected in section, f"docs/scaling.md 'Scaling out' lacks the {what} command: {expected}"


def test_retrieval_launcher_passes_through_like_pretrain(stubs):
    for invocation, *_ in [c[1:] for c in COMMANDS if not c[1].startswith("sbatch")]:
        pre = dry_run(invocation, stubs, gpus=8)
        ret = dry_run(invocation.replace("pretrain.sh", "retrieval.sh"), stubs, gpus=8)
        assert ret.returncode == 0 and ret.stdout == pre.stdout.replace("mmtrain/pretrain.py", "mmtrain/retrieval.py")


def test_cuda_visible_devices_and_runner_choice(stubs):
    # deepspeed honours CUDA_VISIBLE_DEVICES only without --num_gpus: the launcher then leaves it out
    proc = dry_run("launchers/pretrain.sh x=1", stubs, gpus=8, env={"CUDA_VISIBLE_DEVICES": "2,3"})
    assert proc.stdout.strip() == "deepspeed mmtrain/pretrain.py x=1"
    proc = dry_run("launchers/pretrain.sh --runner torchrun x=1", stubs, gpus=8, env={"CUDA_VISIBLE_DEVICES": "2,3"})
    assert proc.stdout.startswith("torchrun --standalone --nproc_per_node 2 ")
    proc = dry_run("launchers/pretrain.sh --nnodes 2 --node_rank 1 --master_addr 10.0.0.1 x=1", stubs, gpus=4)
    assert proc.stdout.startswith("torchrun --nnodes 2 --nproc_per_node 4 --node_rank 1 --master_addr 10.0.0.1 "
                                  "--master_port 29500 ")
    proc = dry_run("launchers/pretrain.sh --master-port=29511 'train.lr=1e-3' 'logging.name=a b'", stubs)
    assert proc.stdout.strip() == (f"torchrun --master_addr 127.0.0.1 --master_port 29511 --nproc_per_node 1 "
                                   f"--signals_to_handle {SIGNALS} mmtrain/pretrain.py train.lr=1e-3 logging.name=a\\ b")


def test_entry_path_is_absolute_outside_the_repository(stubs, tmp_path):
    proc = dry_run(f"{LAUNCHERS / 'pretrain.sh'} x=1", stubs, cwd=tmp_path)
    assert proc.stdout.strip().endswith(f"{ROOT / 'mmtrain' / 'pretrain.py'} x=1")


def test_hostfile_example_parses_as_a_deepspeed_hostfile():
    from deepspeed.launcher.runner import _parse_hostfile

    pool = _parse_hostfile((LAUNCHERS / "hostfile.example").read_text().splitlines())
    assert dict(pool) == {"worker-0": 8, "worker-1": 8}


def test_hostfile_launch_forwards_the_network_knobs(stubs):
    proc = dry_run(COMMANDS[3][1], stubs, gpus=8, env={"NCCL_SOCKET_IFNAME": "eth0", "NCCL_IB_DISABLE": "1"})
    assert proc.stdout.strip() == COMMANDS[3][4]
    assert "forwarded to every node (DS_ENV_FILE): NCCL_SOCKET_IFNAME=eth0 NCCL_IB_DISABLE=1" in proc.stderr


@pytest.mark.parametrize("invocation,message", [
    ("launchers/pretrain.sh --nnodes 2", "--nnodes needs --rdzv_endpoint HOST:PORT"),
    ("launchers/pretrain.sh --nnodes 2 --node_rank 1", "--node_rank needs --master_addr"),
    ("launchers/pretrain.sh --hostfile h --nnodes 2", "pick one"),
    ("launchers/pretrain.sh --runner mpi", "--runner must be deepspeed or torchrun"),
    ("launchers/pretrain.sh --nproc", "--nproc needs a value"),
    ("launchers/pretrain.sh --rdzv_endpoint h:1", "add --nnodes N"),
    ("launchers/pretrain.sh --master_addr 10.0.0.1", "--master_addr is for --hostfile"),
    ("launchers/pretrain.sh --hostfile h --max_restarts 3", "--max_restarts is a torchrun option"),
    ("launchers/slurm_pretrain.sbatch", "not inside a SLURM job"),
    ("launchers/tensorboard.sh --bind 0.0.0.0", "unknown option --bind"),
])
def test_launcher_errors_are_clear(invocation, message, stubs):
    proc = dry_run(invocation, stubs)
    assert proc.returncode == 2 and message in proc.stderr, (proc.returncode, proc.stderr)


def test_tensorboard_serves_on_localhost_unless_told(stubs):
    proc = dry_run("launchers/tensorboard.sh runs", stubs)
    assert proc.stdout.strip() == "tensorboard --logdir runs --host 127.0.0.1 --port 6006"
    assert proc.stderr == ""
    proc = dry_run("launchers/tensorboard.sh --port 7007 --host 0.0.0.0 runs/x -- --reload_interval 5", stubs)
    assert proc.stdout.strip() == "tensorboard --logdir runs/x --host 0.0.0.0 --port 7007 --reload_interval 5"
    assert "not only on this machine" in proc.stderr


def test_no_launcher_evaluates_strings():
    for script in [*SCRIPTS, LAUNCHERS / "env.sh"]:
        code = "\n".join(line for line in script.read_text().splitlines() if not line.lstrip().startswith("#"))
        assert not re.search(r"(^|[;&|\s])eval\s", code), script.name


# --------------------------------------------------------------------------------------------
# Real runs through the launchers
# --------------------------------------------------------------------------------------------

def private_shm_prefix():
    """A command prefix that gives what follows its own /dev/shm, as a separate machine has (a
    mount namespace with a fresh tmpfs); None where that is not allowed."""
    for unshare in (["unshare", "--mount", "--propagation", "private"],
                    ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]):
        prefix = unshare + ["sh", "-c", 'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "node"]
        try:
            if subprocess.run(prefix + ["true"], capture_output=True, timeout=30).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


@pytest.mark.slow
def test_two_torchrun_nodes_with_zero3_train_like_one_process(demo_shards, stubs, tmp_path):
    """Two torchrun agents ("nodes": --nnodes 2, one process each, c10d rendezvous on 127.0.0.1)
    train the tiny config with ZeRO 3 and log the losses of one process with the same global batch
    (8 = micro 4 x 2 ranks there, micro 4 x 2 accumulation steps here).

    Each node gets its own /dev/shm, as on separate machines (mosaicml-streaming keys its shared
    memory by node). The data order must not depend on the node count for the comparison, so
    both runs set data.num_canonical_nodes=1 (the default follows the number of physical nodes).
    """
    shm = private_shm_prefix()
    if shm is None:
        pytest.skip("cannot give each simulated node its own /dev/shm (needs unshare + mount)")
    args = ["--config", str(TINY), f"data.shard_dir={demo_shards}", "train.steps=6", "engine.zero_stage=3",
            "train.eval_every=0", "checkpoint.every=0", "engine.peak_flops=1e11", "data.num_canonical_nodes=1"]
    nodes_dir, one_dir = tmp_path / "two_nodes", tmp_path / "one_process"
    invocation = (f"launchers/pretrain.sh --nnodes 2 --nproc 1 --rdzv_endpoint 127.0.0.1:{free_port()} "
                  f"--rdzv_id two-nodes {shlex.join(args)} logging.run_dir={nodes_dir}")
    command = shlex.split(dry_run(invocation, stubs).stdout)
    assert command[:10] == ["torchrun", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                            "--rdzv_endpoint", invocation.split()[6], "--rdzv_id"]
    env = {"PATH": launcher_env(stubs)["PATH"]}
    nodes = [start_process(shm + command, env=env) for _ in range(2)]
    try:
        pretrain_in_process(args + [f"logging.run_dir={one_dir}"])   # the one process, here while the nodes train
    except BaseException:
        for p in nodes:
            p.kill()
        raise
    results = [finish(p) for p in nodes]
    for rc, output in results:
        assert rc == 0, output[-4000:]
    assert "world=2 zero=3" in results[0][1] + results[1][1]
    two, one = train_losses(nodes_dir), train_losses(one_dir)
    assert sorted(two) == sorted(one) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-6, abs=0), step


@pytest.mark.slow
def test_slurm_script_saves_and_requeues_on_usr1_and_the_requeued_job_resumes(demo_shards, stubs, tmp_path):
    """The sbatch script as SLURM runs it, with srun / scontrol stand-ins: SIGUSR1 to the batch
    shell (what --signal=B:USR1@300 sends) reaches the worker through srun and torchrun; the worker
    saves and exits 75; the script requeues the job; the requeued job resumes from that checkpoint."""
    run_dir, log = tmp_path / "run", tmp_path / "scontrol.log"
    env = {**launcher_env(stubs, 0, {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "tiny", "SLURM_NNODES": "1",
                                    "SLURM_JOB_NODELIST": "localhost", "FAKE_NODES": "127.0.0.1",
                                    "MMTRAIN_RDZV_PORT": str(free_port()), "STUB_LOG": str(log),
                                    "SLURM_SUBMIT_DIR": str(ROOT)})}
    script = ["bash", str(LAUNCHERS / "slurm_pretrain.sbatch"), "--config", TINY, f"data.shard_dir={demo_shards}",
              f"logging.run_dir={run_dir}", "train.steps=100000", "checkpoint.every=0", "train.eval_every=0",
              "logging.log_every=1000", "engine.peak_flops=1e11"]
    job = start_process(script, env=env, cwd=tmp_path)  # sbatch runs the script elsewhere; it cds to the submit dir
    try:
        wait_for_step(run_dir, 1, job)
        job.send_signal(signal.SIGUSR1)
        rc, output = finish(job, timeout=180)
    finally:
        job.kill()
    assert rc == 0, output[-4000:]
    assert "got SIGUSR1" in output and "requeueing job 4242" in output
    assert log.read_text() == "requeue 4242\n"
    stopped = max(train_losses(run_dir))
    assert f"SIGUSR1: stopped at step {stopped} with checkpoint" in output
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}"

    rc, output = finish(start_process(script + [f"train.stop_at={stopped + 1}"], env=env, cwd=tmp_path))
    assert rc == 0, output[-4000:]
    assert f"step_{stopped:08d} at step {stopped}" in output  # "resumed from ..."
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped + 1:08d}"
    assert log.read_text() == "requeue 4242\n"  # a run that ends normally is not requeued
