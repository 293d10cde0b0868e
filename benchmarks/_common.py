"""Helpers shared by the benchmarks: isolated runs, peak memory, matmul peak, tables, machine info.

Peak memory on CPU is measured per configuration in a process of its own: the benchmark imports
torch / deepspeed once, then ``fork()``s one child per configuration (:func:`run_isolated`). The
child resets the kernel's peak-RSS counter (``/proc/self/clear_refs``, value 5), runs, and
reports ``VmHWM - RSS at start`` (:class:`PeakRSS`): the memory the configuration itself touched
(weights, gradients, optimizer state, activations, DeepSpeed buffers), without the ~0.2-0.5 GiB
of imported libraries. Where ``clear_refs`` is not writable it falls back to
``ru_maxrss - RSS at start``, which can only over-count by the parent's import-time peak.
On CUDA the configurations run in the calling process and memory is
``torch.cuda.max_memory_allocated`` (reset before each one).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import pickle
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from a clone without `pip install -e`
    sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------

def _status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class PeakRSS:
    """Peak resident memory of this process from construction on, minus the RSS at construction.

    ``method`` says how it is measured: ``"VmHWM"`` (peak counter reset through
    /proc/self/clear_refs) or ``"ru_maxrss"`` (process-lifetime peak; fallback).
    """

    def __init__(self):
        self.start_kib = _status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")
            self.method = "VmHWM"
        except OSError:
            self.method = "ru_maxrss"

    def peak_mib(self) -> float:
        if self.method == "VmHWM":
            peak = _status_kib("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return max(peak - self.start_kib, 0) / 1024.0


class CudaPeak:
    """``torch.cuda.max_memory_allocated`` since construction (the counter is reset)."""

    method = "cuda max_memory_allocated"

    def __init__(self, device):
        import torch

        self.device = device
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def peak_mib(self) -> float:
        import torch

        return torch.cuda.max_memory_allocated(self.device) / 2**20


def memory_meter(device):
    return CudaPeak(device) if device.type == "cuda" else PeakRSS()


# --------------------------------------------------------------------------------------------
# Isolated runs
# --------------------------------------------------------------------------------------------

def run_isolated(fn: Callable[..., Dict[str, Any]], *args: Any, fork: bool = True) -> Dict[str, Any]:
    """``fn(*args)`` in a forked child (``fork=True``) or in this process; returns its dict.

    A failure in ``fn`` comes back as ``{"error": "<exception>"}`` (with the traceback on stderr)
    instead of stopping the benchmark. The parent must not have started OpenMP / CUDA work before
    forking (the benchmarks only import torch and deepspeed in the parent).
    """
    if not fork:
        try:
            return fn(*args)
        except Exception as exc:  # one failing configuration must not end the whole table
            traceback.print_exc()
            return {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        code = 0
        try:
            result = fn(*args)
        except BaseException as exc:
            traceback.print_exc()
            result, code = {"error": f"{type(exc).__name__}: {exc}"}, 1
        try:
            with os.fdopen(write_fd, "wb") as fh:
                pickle.dump(result, fh)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    if data:
        return pickle.loads(data)
    return {"error": f"child process died (wait status {status})"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackS3:
    """An S3 HTTP API on 127.0.0.1 (moto's server mode, ``moto_server`` from ``moto[server]``) for
    benchmarks that read shards from a bucket. Inside ``with``, ``S3_ENDPOINT_URL`` and dummy AWS
    credentials are set in ``os.environ`` (so loader workers see them too) and restored on exit;
    the server process is stopped then. It measures the client and cache path, not a network."""

    def __init__(self, log_path: Path, port: int = 0):
        self.port = port or free_port()
        self.log_path = Path(log_path)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"S3_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "mmtrain-bench",
                    "AWS_SECRET_ACCESS_KEY": "mmtrain-bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}
        self.proc: Optional[subprocess.Popen] = None
        self._saved: Dict[str, Optional[str]] = {}

    def __enter__(self) -> "LoopbackS3":
        import urllib.request

        exe = Path(sys.executable).with_name("moto_server")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
        if not exe.exists() and importlib.util.find_spec("moto") is None:
            raise RuntimeError('no S3 server to read from: pip install "moto[server]" (or skip the bucket with '
                               "--no-remote)")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd + ["-H", "127.0.0.1", "-p", str(self.port)], stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"moto_server on port {self.port} did not start; its log: "
                                       f"{self.log_path.read_text(errors='replace')[-2000:]}") from None
                time.sleep(0.1)
        self._saved = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)
        return self

    def __exit__(self, *exc: Any) -> None:
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved = {}
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self._log.close()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` (3-63 characters, S3's rules); returns ``s3://name``."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def upload_dir(self, local: Path, url: str) -> None:
        """Copy the files under ``local`` to ``s3://bucket/prefix/<relative path>``."""
        bucket, _, prefix = url[len("s3://"):].partition("/")
        client = self.client()
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                key = "/".join(p for p in (prefix.strip("/"), path.relative_to(local).as_posix()) if p)
                client.upload_file(str(path), bucket, key)


def single_process_env() -> None:
    """Environment of a one-process DeepSpeed world with a fresh rendezvous port."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        os.environ.pop(key, None)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))


def preload_engine_modules() -> None:
    """Import in the parent what ``deepspeed.initialize`` and the first optimizer import lazily
    (torch._dynamo, sympy, inductor's config, DeepSpeed's ZeRO optimizers: ~10-25 s on 2 cores),
    so forked configurations do not each pay for it. Runs no tensor computation."""
    import importlib

    import torch

    for name in ("torch._dynamo", "torch._inductor.compile_fx", "deepspeed.runtime.engine",
                 "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3",
                 "deepspeed.runtime.bf16_optimizer", "deepspeed.runtime.zero.muon.muon_optimizer",
                 "deepspeed.runtime.zero.utils", "deepspeed.runtime.config",
                 "deepspeed.module_inject.auto_ep_config"):
        try:
            importlib.import_module(name)
        except Exception:  # a module moved in another version: the child imports what it needs
            pass
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])


def quiet_deepspeed() -> None:
    """Keep DeepSpeed's per-engine INFO lines and deprecation notices out of the benchmark output."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)

    try:
        from deepspeed.utils import logger

        logger.setLevel(logging.WARNING)
    except Exception:
        pass


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def synchronize(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def timed_repeats(step: Callable[[], None], device, warmup: int, repeats: int) -> List[float]:
    """Run ``step`` ``warmup`` times untimed, then ``repeats`` times; returns the seconds of each."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def matmul_peak(device, dtype, max_size: int = 2048, repeats: int = 3) -> float:
    """Best dense matmul FLOP/s of ``dtype`` on ``device`` (square sizes 512 .. max_size; stops
    growing once one product takes > 0.5 s, which bounds the cost of an emulated dtype)."""
    import torch

    best, size = 0.0, 512
    while size <= max_size:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        times = timed_repeats(lambda: a @ b, device, warmup=1, repeats=repeats)
        best = max(best, 2.0 * size**3 / min(times))
        if min(times) > 0.5:
            break
        size *= 2
    return best


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def machine_info() -> Dict[str, str]:
    """CPU model, cores, library versions and load average (imports nothing heavy)."""
    from importlib import metadata

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": str(os.cpu_count())}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch threads"] = str(torch.get_num_threads())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    info.update({
        "torch": version("torch"),
        "deepspeed": version("deepspeed"),
        "python": platform.python_version(),
        "load avg (1/5/15 min)": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
    })
    return info


def print_machine(info: Dict[str, str], extra: Optional[Dict[str, str]] = None) -> None:
    items = {**info, **(extra or {})}
    print("; ".join(f"{k}: {v}" for k, v in items.items()), flush=True)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Optional[str] = None) -> str:
    """Rows of already formatted cells -> a markdown table; ``align`` is one of 'l'/'r' per column."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(out_dir: Path, name: str, info: Dict[str, str], header: str, text: str,
           records: List[Dict[str, Any]]) -> None:
    """Print the machine line, ``header`` and the table ``text``; write ``<name>.md`` (the same)
    and ``<name>.csv`` (``records``) into ``out_dir``."""
    print()
    print_machine(info)
    print(header)
    print()
    print(text, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text(
        "; ".join(f"{k}: {v}" for k, v in info.items()) + "\n\n" + header + "\n\n" + text + "\n", encoding="utf-8")
    write_csv(out_dir / f"{name}.csv", records)
    print(f"\nwrote {out_dir / (name + '.md')}, {name}.csv")


def write_csv(path: Path, records: List[Dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: List[str] = []
    for record in records:
        fields += [k for k in record if k not in fields]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)


def fmt(value: Optional[float], digits: int = 0, suffix: str = "") -> str:
    """Thousands-separated number, or '—' for a missing value."""
    if value is None:
        return "—"
    return f"{value:,.{digits}f}{suffix}"
