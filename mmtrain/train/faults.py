"""Fault tolerance shared by the training entry scripts (pretrain.py, retrieval.py).

* **Graceful stop.** SIGTERM and SIGUSR1 (what SLURM sends before preemption and before the time
  limit) only set a flag (:class:`StopRequest`). The training loop checks it at every step
  boundary, agreed across ranks with one all-reduce so that every rank stops at the same step,
  writes a checkpoint and exits with :data:`EXIT_PREEMPTED`. Relaunching with
  ``checkpoint.resume=auto`` continues from that checkpoint.
* **Run-directory lock** (:class:`RunDirLock`). Rank 0 holds a POSIX lock on
  ``<run_dir>/mmtrain.lock`` for the life of the run, so two jobs pointed at one run directory
  cannot both write it; the second fails naming the holder (pid, host). The kernel drops the
  lock when the holder dies, even by ``kill -9``, so a relaunch is never blocked.
* **Preflight checks** before any training: the run directory is writable
  (:func:`check_writable`), none of the files a run writes there is a symbolic link
  (:func:`symlinked_run_files`), and its file system has room for a checkpoint
  (:func:`checkpoint_bytes`, :func:`check_free_space`).
* **Run files are never followed** (:func:`open_run_file`): every file a run writes in its run
  directory is opened with ``O_NOFOLLOW``, so a link planted there cannot make a run truncate or
  overwrite the file it points at.
* **Full disk** (:class:`DiskFull`, :func:`is_disk_full`): a checkpoint write that fails for lack of
  space is one error naming the path and the space needed; the previous checkpoint and ``latest``
  stay as they were.
* **Test hook** (:func:`inject`): ``MMTRAIN_FAULT`` makes a process kill or signal itself at a
  chosen point, so tests can interrupt a run exactly where they mean to.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import socket
import stat
import sys
import time
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from mmtrain import files
from mmtrain.files import human_bytes

EXIT_PREEMPTED = 75
"""Exit code after a stop signal: a checkpoint was written; relaunch to continue.

75 is ``EX_TEMPFAIL`` of sysexits.h ("temporary failure, try again later"). It is deliberately not
143 (= 128 + SIGTERM), which a shell also reports for a process *killed* by SIGTERM without saving.
"""

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
LOCK_FILE = "mmtrain.lock"
FAULT_ENV = "MMTRAIN_FAULT"


# --------------------------------------------------------------------------------------------
# Graceful stop on SIGTERM / SIGUSR1
# --------------------------------------------------------------------------------------------


class StopRequest:
    """Remembers the first stop signal this process received; :meth:`agreed` shares it.

    The handler only sets a flag: it may run while the process is inside a collective or a
    checkpoint write, which must finish undisturbed. Repeated signals (SLURM, srun and torchrun
    may each deliver one) change nothing.
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = [getattr(signal, name) for name in signals]
        self.signum = 0
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the default behaviour
                pass
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def ignore_further(self) -> None:
        """The run is over: ignore stop signals from now on. A launcher tearing down the other
        ranks may still send one, and during interpreter shutdown Python puts back the default,
        fatal handlers: the process would die by the signal instead of exiting with its code."""
        for sig in self.signals:
            try:
                signal.signal(sig, signal.SIG_IGN)
            except ValueError:
                pass

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def agreed(self, device: torch.device) -> Optional[str]:
        """Name of a stop signal received by *any* rank (all ranks get the same answer), or None.

        A collective: every rank must call it at the same step.
        """
        signum = self.signum
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([signum], dtype=torch.int64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            signum = int(t.item())
        return signal.Signals(signum).name if signum else None


# --------------------------------------------------------------------------------------------
# Run-directory lock
# --------------------------------------------------------------------------------------------


class RunDirLocked(RuntimeError):
    pass


class RunDirLock:
    """An exclusive lock on ``<run_dir>/mmtrain.lock`` for the life of a run.

    POSIX record locks (``lockf``), not ``flock``: they belong to the process, so data-loader
    workers forked from it do not inherit them, and the kernel releases them the moment the
    holder exits or is killed. The file itself stays (deleting a lock file races with the next
    locker); its text names the current holder.
    """

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._fd: Optional[int] = None

    def acquire(self) -> "RunDirLock":
        # Not open_run_fd: a lock file shared with another name (a `cp -al` snapshot of a running
        # job's directory) is locked as it is first, so that a job holding it is seen; only then is
        # it given an inode of its own (_own_lock).
        fd = _open_nofollow(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                holder = _read_text(fd).strip() or "another process"
                os.close(fd)
                raise RunDirLocked(
                    f"{os.path.dirname(self.path)} is in use by another mmtrain job ({holder}); two jobs "
                    f"must not write one run directory. Stop that job or pick another logging.run_dir "
                    f"(lock file: {self.path})") from None
            if exc.errno == errno.ENOLCK:  # a file system without locks: run unprotected, say so
                os.close(fd)
                print(f"[mmtrain] warning: {self.path}: file locking is not supported here; nothing "
                      "stops a second job from writing this run directory", file=sys.stderr, flush=True)
                return self
            os.close(fd)
            raise
        fd = self._own_lock(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self._fd = fd
        return self

    def _own_lock(self, fd: int) -> int:
        """The locked ``fd``, or, when its file has another name too, a lock on a copy of its own
        (taken while the shared one is still held; the shared one is then let go unchanged)."""
        if not _hard_linked(os.fstat(fd)):
            return fd
        own_copy(self.path)
        mine = _open_nofollow(self.path, os.O_RDWR)
        try:
            fcntl.lockf(mine, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(mine)
            os.close(fd)
            raise RunDirLocked(f"{self.path} changed while it was being locked; run again") from None
        os.close(fd)   # releases the lock on the shared file, whose bytes were never written
        return mine

    def release(self) -> None:
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read_text(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", "replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------
# Run files: opened without following symbolic links
# --------------------------------------------------------------------------------------------

# The files a run writes directly in its run directory (relative paths). Directories (tensorboard/,
# checkpoints/) may be links, e.g. to a larger disk; files may not: writing through a planted link
# would truncate or overwrite whatever it points at.
RUN_FILES = (LOCK_FILE, "config.yaml", "config.yaml.tmp", "deepspeed_config.json", "metrics.jsonl",
             "metrics.jsonl.tmp", os.path.join("checkpoints", "latest"))


class RunFileLink(OSError):
    """A run file is a symbolic link, which mmtrain does not follow (the message says so)."""


def _link_problem(path: str) -> str:
    return (f"{path} is a symbolic link; mmtrain writes this file itself and does not write through links in a "
            "run directory (it would overwrite the file the link points at). Remove the link, or use another "
            "logging.run_dir")


def _hard_linked(st: os.stat_result) -> bool:
    """A regular file with another name: writing it in place would write that file too."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink > 1


def _open_nofollow(path: str, flags: int, mode: int = 0o666) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunFileLink(_link_problem(path)) from None
        raise


def own_copy(path: str) -> bool:
    """Give the run file ``path`` an inode of its own when another name shares it (a ``cp -al`` or
    ``rsync --link-dest`` snapshot of the run, or a planted hard link): its bytes are copied to a
    new file that is renamed over ``path``, so writing it changes nothing under the other name.
    Whether it did. Call it only on files this process alone writes (under the run-directory lock)."""
    try:
        if not _hard_linked(os.lstat(path)):
            return False
    except FileNotFoundError:
        return False
    tmp = f"{path}.own-{os.getpid()}"
    if os.path.lexists(tmp):
        os.remove(tmp)
    src = _open_nofollow(path, os.O_RDONLY)
    try:
        dst = _open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IMODE(os.fstat(src).st_mode))
        try:
            while chunk := os.read(src, 1 << 20):
                os.write(dst, chunk)
            os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    os.replace(tmp, path)
    return True


def open_run_fd(path: str, flags: int, mode: int = 0o666) -> int:
    """``os.open`` of a run file with ``O_NOFOLLOW`` (``mode``: as ``open`` creates files, less the
    umask): RunFileLink when ``path`` is a symbolic link. Opened for writing, a file that shares its
    inode with another name is first given its own copy (:func:`own_copy`)."""
    if flags & (os.O_WRONLY | os.O_RDWR):
        own_copy(path)
    return _open_nofollow(path, flags, mode)


def open_run_file(path: str, mode: str = "r", encoding: Optional[str] = "utf-8"):
    """``open(path, mode)`` for a file in a run directory, never through a symbolic link (RunFileLink)
    nor into another name's file (:func:`open_run_fd`). Modes: r, w, a (text) and rb, wb, ab."""
    flags = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
             "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND}[mode[0]]
    fd = open_run_fd(path, flags)
    try:
        return os.fdopen(fd, mode, encoding=None if "b" in mode else encoding)
    except BaseException:
        os.close(fd)
        raise


def write_run_file(path: str, text: str) -> None:
    """Replace the run file ``path`` with ``text`` atomically: a fresh temporary sibling (whatever
    had its name is removed, never followed), then a rename."""
    tmp = f"{path}.tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    fd = _open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def symlinked_run_files(run_dir: str) -> List[str]:
    """One problem per run file (:data:`RUN_FILES`) of ``run_dir`` that is a symbolic link (hard links
    are given their own copy when written: :func:`own_copy`)."""
    return [_link_problem(os.path.join(run_dir, name)) for name in RUN_FILES
            if os.path.islink(os.path.join(run_dir, name))]


# --------------------------------------------------------------------------------------------
# Preflight: writable run directory, free disk
# --------------------------------------------------------------------------------------------


def check_writable(run_dir: str) -> Optional[str]:
    """None when ``run_dir`` can be created and written, else what went wrong."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write_test{os.getpid()}")
        if os.path.lexists(probe):   # left by a killed process of the same pid (or planted): not followed
            os.remove(probe)
        fd = open_run_fd(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.remove(probe)
    except OSError as exc:
        return f"cannot write to {run_dir}: {exc.strerror or exc}"
    return None


# Bytes of one checkpoint: (bytes per stored parameter, fixed bytes per rank), measured on
# DeepSpeed 0.19.8 (the files of a checkpoint directory of a mixer trained one step at d_model 32
# and 128, one rank; the two sizes give the slope and the intercept; tests/test_resume_refusals.py
# checks them against real checkpoints). Per parameter: Adam's two fp32 moments (8 B), an fp32
# master copy (4 B) except at ZeRO 0, and the module weights in the model-states file (fp32 4 B,
# bf16 2 B) except at ZeRO 3, whose model-states files hold no weights (the fp32 partitions of its
# optimizer files are the weights). Per rank: RNG state, file headers, manifest, config (33-48 KB).
CHECKPOINT_BYTES = {
    (0, "fp32"): (12, 48_000),
    (1, "fp32"): (16, 34_000), (2, "fp32"): (16, 34_000), (3, "fp32"): (12, 37_000),
    (1, "bf16"): (14, 34_000), (2, "bf16"): (14, 34_000), (3, "bf16"): (12, 37_000),
}


def checkpoint_bytes(num_params: int, precision: str = "fp32", zero_stage: int = 1, world_size: int = 1) -> int:
    """Estimated size of one checkpoint of ``num_params`` stored parameters, from the measured
    bytes per parameter and per rank of :data:`CHECKPOINT_BYTES` (fp16 is stored as bf16 is; a
    combination not measured gets the largest figures)."""
    precision = "bf16" if precision in ("bf16", "fp16") else "fp32"
    per_param, per_rank = CHECKPOINT_BYTES.get((int(zero_stage), precision),
                                               (max(v[0] for v in CHECKPOINT_BYTES.values()),
                                                max(v[1] for v in CHECKPOINT_BYTES.values())))
    return int(num_params * per_param + per_rank * max(int(world_size), 1))


def free_bytes(path: str) -> int:
    override = _fault_value("disk_free")
    if override is not None:
        return int(override)
    return shutil.disk_usage(path).free


def check_free_space(path: str, checkpoint_size: int, keep_last: int) -> Tuple[Optional[str], Optional[str]]:
    """``(error, warning)`` for the free space under ``path``.

    Error: not even one more checkpoint fits (training would fail at its first save). Warning: the
    ``keep_last`` checkpoints plus the one being written (old ones are deleted only after a newer
    one is complete) may not fit.
    """
    free = free_bytes(path)
    if free < checkpoint_size:
        return (f"{path} has {human_bytes(free)} free, but one checkpoint of this model needs about "
                f"{human_bytes(checkpoint_size)} (weights + AdamW state). Free some space or point "
                "logging.run_dir at a larger disk"), None
    window = (keep_last + 1) if keep_last > 0 else 2
    if free < window * checkpoint_size:
        return None, (f"{path} has {human_bytes(free)} free; keeping checkpoint.keep_last={keep_last} "
                      f"checkpoints of ~{human_bytes(checkpoint_size)} each may need {human_bytes(window * checkpoint_size)}")
    return None, None


class DiskFull(OSError):
    """A write failed because its file system is full; the message names the path and the space
    needed (the entry scripts exit with code 2)."""


def is_disk_full(exc: BaseException, path: str, needed: int) -> bool:
    """Whether ``exc``, raised while writing about ``needed`` bytes under ``path``, came from a full
    disk: an ENOSPC / EDQUOT OSError (in its chain of causes), or an OSError or RuntimeError while
    fewer than ``needed`` bytes are free (DeepSpeed saves through torch's C++ writer, whose error says
    only ``basic_ios::clear`` or ``unexpected pos``)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and files.is_disk_full(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    if not isinstance(exc, (OSError, RuntimeError)):
        return False
    try:
        return free_bytes(path) < needed
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Test hook: MMTRAIN_FAULT
# --------------------------------------------------------------------------------------------
#
# MMTRAIN_FAULT holds comma-separated faults ``<what>[:<n>][@<rank>]``:
#   kill_at_step:N        SIGKILL this process right after optimizer step N (before logging it)
#   sigterm_at_step:N     send SIGTERM to this process after step N (SIGUSR1: sigusr1_at_step:N)
#   after_model_states[:N]  SIGKILL inside a checkpoint write (step N, or any): the engine files
#                         are written, the RNG files and the `latest` pointer are not
#   before_latest[:N]     SIGKILL after every rank finished writing, before `latest` moves
#   disk_free:BYTES       pretend the run directory's file system has BYTES free
#   enospc_in_checkpoint[:N]  raise OSError(ENOSPC) inside a checkpoint write (where
#                         after_model_states kills): a disk that fills up mid-write
# ``@R`` limits a fault to global rank R (e.g. ``sigusr1_at_step:3@1``).

_ACTIONS = {
    "kill_at_step": ("step", signal.SIGKILL),
    "sigterm_at_step": ("step", signal.SIGTERM),
    "sigusr1_at_step": ("step", signal.SIGUSR1),
    "after_model_states": ("after_model_states", signal.SIGKILL),
    "before_latest": ("before_latest", signal.SIGKILL),
    "enospc_in_checkpoint": ("after_model_states", None),   # None: raise OSError(ENOSPC)
}


def _parse_faults() -> List[Tuple[str, Optional[int], Optional[int]]]:
    spec = os.environ.get(FAULT_ENV, "").strip()
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        rank = None
        if "@" in item:
            item, r = item.split("@", 1)
            rank = int(r)
        what, _, value = item.partition(":")
        faults.append((what, int(value) if value else None, rank))
    return faults


def _fault_value(what: str) -> Optional[int]:
    for name, value, _ in _parse_faults():
        if name == what:
            return value
    return None


def inject(point: str, step: Optional[int] = None, rank: Optional[int] = None) -> None:
    """Fire the ``MMTRAIN_FAULT`` faults registered for ``point`` at this step and rank (tests only)."""
    for what, n, only_rank in _parse_faults():
        action = _ACTIONS.get(what)
        if action is None or action[0] != point:
            continue
        if n is not None and n != step:
            continue
        if only_rank is not None and rank is not None and only_rank != rank:
            continue
        if action[1] is None:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({FAULT_ENV}={what})")
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), action[1])
