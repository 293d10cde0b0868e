"""Shared fixtures: demo shards made once per session, and helpers to run the real entry scripts."""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pretrain" / "tiny.yaml"

# One streaming shared-memory namespace per test process (each xdist worker, each concurrent
# session) and one per process it launches (script_env; the ranks of a launch share it): loaders
# created at the same instant by any two of them never take the same /dev/shm names.
os.environ["MMTRAIN_SHM_NAMESPACE"] = f"t{os.getpid()}"
_LAUNCHES = itertools.count()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def shared_once(tmp_path_factory, name: str, build) -> Path:
    """``build(dir)`` once per test session, also when pytest-xdist workers share the session: the
    first worker to need it builds it under a lock in the session's common temp dir, the others
    wait for it and reuse it (a build that failed is redone by the next one). Returns the dir."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent                  # pytest-N/, above every worker's popen-gwK/
    out, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """Demo-corpus shards at n_ctx 32 and 64 (first 600 documents, shipped tokenizer)."""
    from mmtrain.data.prepare import demo_prepare_config, prepare

    return shared_once(tmp_path_factory, "demo_shards", lambda out: prepare(
        demo_prepare_config(str(out), [32, 64], max_docs=600), progress=False))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env() -> dict:
    env = dict(os.environ)
    # Tiny models: one BLAS thread per process is faster and keeps parallel ranks from thrashing.
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "MMTRAIN_FAULT"):
        env.pop(key, None)
    env["MMTRAIN_SHM_NAMESPACE"] = f"t{os.getpid()}n{next(_LAUNCHES)}"
    return env


def pretrain_command(launcher="python", nproc=1) -> list:
    """The command line that starts mmtrain/pretrain.py with ``launcher`` (arguments follow it)."""
    script = str(ROOT / "mmtrain" / "pretrain.py")
    if launcher == "python":
        return [sys.executable, script]
    if launcher == "module":
        return [sys.executable, "-m", "mmtrain.pretrain"]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}", script]
    if launcher == "deepspeed":
        return [str(Path(sys.executable).parent / "deepspeed"), f"--master_port={free_port()}", script]
    raise ValueError(launcher)


def run_pretrain(args, launcher="python", nproc=1, check=True, timeout=300, env=None):
    """Run mmtrain/pretrain.py as a user would; returns the CompletedProcess."""
    cmd = pretrain_command(launcher, nproc)
    full_env = script_env()
    full_env.update(env or {})
    proc = subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def train_in_process(schema, task_cls, configs, overrides):
    """One real training run (the Trainer, its task and a DeepSpeed engine; a world of one) in
    this process: what a launched run does, without paying a process start and its imports.
    The process group stays up for the next in-process run (DeepSpeed caches its groups).
    Returns the finished Trainer; a ConfigError propagates."""
    from mmtrain.config import load_config
    from mmtrain.train.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the launched runs (OMP_NUM_THREADS=1): the same losses bit for bit
    try:
        trainer = Trainer(load_config(schema, [str(c) for c in configs], [str(o) for o in overrides]), task_cls())
        try:
            trainer.run()
        finally:
            trainer.release_run_dir()
            trainer.stop_request.uninstall()   # give the test process its own signal handlers back
    finally:
        torch.set_num_threads(threads)
    return trainer


def split_config_args(args):
    """["--config", A, "k=v", ...] -> ([A], ["k=v", ...])."""
    args = [str(a) for a in args]
    configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    overrides = [a for i, a in enumerate(args) if a != "--config" and (i == 0 or args[i - 1] != "--config")]
    return configs, overrides


def pretrain_in_process(args):
    """:func:`train_in_process` of LM pretraining with `mmtrain/pretrain.py`'s arguments."""
    from mmtrain.train.lm import LMTask
    from mmtrain.train.schema import PretrainConfig

    return train_in_process(PretrainConfig, LMTask, *split_config_args(args))


def read_metrics(run_dir) -> list:
    with open(Path(run_dir) / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def train_losses(run_dir) -> dict:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


# --------------------------------------------------------------------------------------------
# Trained checkpoints of every ZeRO stage and their exported bundles (test_export / test_evaluate /
# test_generate). All runs start at once (one BLAS thread each) and are shared by the session.
# --------------------------------------------------------------------------------------------

@pytest.fixture()
def one_torch_thread():
    """Run a test with one torch thread: tiny models step several times faster than with two
    threads that fight each other (and other processes) for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TRAIN_STEPS = 12
# one run on 1 and on 2 processes (test_pretrain compares their losses, test_export their bundles); 8-row
# panels: the packed mixing matrices (n_ctx 32) span 4 block rows, partitioned over the ranks
ZERO3_PAIR = ["model.mixer_heads=2", "model.tie_embeddings=true", "model.mixer_block_size=8", "engine.zero_stage=3",
              "data.num_workers=2"]
# name: (overrides on top of tiny.yaml, launcher ("python" = in this process), processes)
TRAINED_RUNS = {
    "mixer_expanded_zero0": (["model.mixer_expansion=2", "engine.zero_stage=0"], "python", 1),
    "mixer_zero1": (["engine.zero_stage=1"], "python", 1),
    "transformer_zero2": (["model.kind=transformer", "model.n_heads=4", "model.n_kv_heads=2",
                           "engine.zero_stage=2"], "python", 1),
    "mixer_heads_tied_zero3": (ZERO3_PAIR, "python", 1),
    "mixer_heads_tied_zero3_2proc": (ZERO3_PAIR, "torchrun", 2),
}


@pytest.fixture(scope="session")
def trained_runs(demo_shards, tmp_path_factory) -> dict:
    """{name: run_dir} of TRAINED_RUNS: 12 steps (lr 1e-2), checkpoints at steps 6 and 12 (one-rank
    runs in this process, the others launched)."""
    base = shared_once(tmp_path_factory, "trained_runs", lambda out: train_runs(demo_shards, out))
    return {name: base / name for name in TRAINED_RUNS}


def train_runs(demo_shards: Path, base: Path) -> None:
    """Train every one of TRAINED_RUNS into ``base / name``."""
    started, in_process = {}, {}
    for name, (overrides, launcher, nproc) in TRAINED_RUNS.items():
        run_dir = base / name
        args = ["--config", TINY, f"data.shard_dir={demo_shards}", f"logging.run_dir={run_dir}",
                f"train.steps={TRAIN_STEPS}", "train.lr=1e-2", "train.eval_every=0", "checkpoint.every=6",
                "engine.peak_flops=1e11", "data.num_workers=0", *overrides]
        if launcher == "python":   # one rank: the same run in this process, while launched ones start
            in_process[name] = args
        else:
            started[name] = start_pretrain(args, launcher, nproc)
    try:
        for args in in_process.values():
            pretrain_in_process(args)
    except BaseException:
        for proc in started.values():
            proc.kill()
        raise
    for proc in started.values():
        output, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(proc.args)} exited {proc.returncode}\n{output[-6000:]}")


@pytest.fixture(scope="session")
def exported_bundles(trained_runs, tmp_path_factory) -> dict:
    """{name: bundle_dir}: the latest checkpoint of every trained run, exported (fp32, verified)."""
    from mmtrain.export.exporter import export

    def build(out):
        for name, run_dir in trained_runs.items():
            export(str(run_dir), str(out / name))

    base = shared_once(tmp_path_factory, "bundles", build)
    return {name: base / name for name in trained_runs}


# --------------------------------------------------------------------------------------------
# Runs that are interrupted on purpose (test_fault_tolerance / test_launchers): start them in the
# background, wait for their metrics, read their checkpoints.
# --------------------------------------------------------------------------------------------

def start_process(cmd, env=None, cwd=ROOT) -> subprocess.Popen:
    """Start ``cmd`` (a list) in the background with the test environment plus ``env``; output is
    captured (stdout and stderr together)."""
    full_env = script_env()
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    full_env.update(env or {})
    return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def start_pretrain(args, launcher="python", nproc=1, env=None) -> subprocess.Popen:
    """mmtrain/pretrain.py started like :func:`run_pretrain`, but in the background."""
    return start_process(pretrain_command(launcher, nproc) + [str(a) for a in args], env=env)


def finish(proc: subprocess.Popen, timeout=300):
    """Wait for ``proc``; returns ``(returncode, output)`` (killing it on timeout)."""
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s:\n{output[-6000:]}")
    return proc.returncode, output


def wait_for_step(run_dir, step: int, proc: subprocess.Popen, timeout=240) -> int:
    """Block until ``<run_dir>/metrics.jsonl`` records a training step >= ``step``; return it."""
    import time

    deadline = time.monotonic() + timeout
    path = Path(run_dir) / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before step {step}:\n{proc.stdout.read()[-6000:]}")
        if path.is_file():
            steps = [json.loads(line)["step"] for line in path.read_text().splitlines()
                     if line.strip().endswith("}") and '"loss"' in line]
            if steps and max(steps) >= step:
                return max(steps)
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no step {step} in {path} after {timeout} s")


def checkpoint_module(run_dir, tag=None) -> dict:
    """The fp32 module weights of a (ZeRO 0-2) checkpoint: ``latest`` unless ``tag`` is given."""
    root = Path(run_dir) / "checkpoints"
    tag = tag or (root / "latest").read_text().strip()
    return torch.load(root / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def _loopback_s3():
    """benchmarks/_common.py's LoopbackS3 (the benchmarks and the tests start the same server)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mmtrain_bench_common", ROOT / "benchmarks" / "_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LoopbackS3


class S3Server(_loopback_s3()):
    """A real S3 HTTP API (moto's server mode) on 127.0.0.1. ``S3_ENDPOINT_URL`` and dummy
    credentials in the test's ``os.environ`` (the :func:`s3_server` fixture sets them) point boto3
    and streaming (and subprocesses) at it. :meth:`stop` and :meth:`start` take it down and bring
    it back on the same port (empty: moto keeps nothing)."""

    def __init__(self, port: int, log_path: Path):
        super().__init__(log_path, port)

    def start(self) -> "S3Server":
        if getattr(self, "_log", None) is not None:
            self._log.close()
        self.__enter__()
        self._saved = {}   # the environment belongs to the test (monkeypatch restores it)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """The store goes down (the environment keeps pointing at it)."""
        if self.running():
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def reset(self) -> None:
        """Empty the store (moto's reset API): what a fresh server holds."""
        import urllib.request

        request = urllib.request.Request(self.endpoint + "/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200, response.status

    def close(self) -> None:
        self.stop()
        self.__exit__(None, None, None)

    def keys(self, url: str) -> list:
        bucket, _, prefix = url[len("s3://"):].partition("/")
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="session")
def s3_process(tmp_path_factory):
    """The moto server process of the session (started by the first :func:`s3_server`)."""
    server = S3Server(free_port(), tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        if getattr(server, "_log", None) is not None:
            server.close()


@pytest.fixture()
def s3_server(s3_process, monkeypatch):
    """An empty moto S3 server for one test (the session's, reset; started again if a test stopped
    it); the test's environment (and its subprocesses') talks to it."""
    for key, value in s3_process.env.items():
        monkeypatch.setenv(key, value)
    if s3_process.running():
        s3_process.reset()
    else:
        s3_process.start()
    return s3_process
