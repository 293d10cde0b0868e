"""Writing output directories safely: the rules every command that writes a directory follows.

* **Never delete what we did not write.** :func:`check_replaceable` refuses a non-empty directory
  that holds no output of the command unless the caller allows it (``--overwrite``), and refuses,
  whatever the caller allows, one that holds anything else besides (those entries are listed).
  A command recognises its own output by the marker :data:`MARKER` (``{"command": ...}``, written
  by :func:`write_marker`) or by the manifest its earlier versions wrote (the caller's ``ours``).
* **Atomic replacement.** :func:`publish_dir` swaps a complete new directory in with one
  ``renameat2(RENAME_EXCHANGE)`` (Linux), so the final name holds the old or the new output at
  every instant; the old one is deleted after. Where the exchange is unsupported it falls back to
  two renames through ``.NAME.old-PID``, which :func:`clean_stale` rolls back after a kill.
* **One writer.** :func:`output_lock` holds an ``flock`` on ``.NAME.lock`` (a sibling) for the
  whole command; a second writer gets an :class:`OutputError` naming the holder's pid.
* **Leftovers of killed runs** (``.NAME.tmp-PID`` / ``.NAME.old-PID``) are removed by
  :func:`clean_stale` once provably stale: their pid is not alive on this host and the caller
  holds the lock; an ``.old`` copy that is the only copy is restored, never deleted.
* **Digests**: :func:`sha256_file`, shared by checkpoint manifests and bundles.
* **A full disk** is an :class:`OutputError` naming the path and the space (:func:`disk_full_error`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import sys
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple, Union

PathLike = Union[str, Path]

MARKER = ".mmtrain-output.json"
MARKER_FORMAT = 1
#: ``.NAME.tmp-PID`` (a new output being built) and ``.NAME.old-PID`` (an old one being replaced)
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


class OutputError(ValueError):
    """An output directory cannot be written (not ours, locked, full disk): exit code 2."""


def _warn(message: str) -> None:
    print(f"mmtrain: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Ownership
# --------------------------------------------------------------------------------------------


def write_marker(directory: PathLike, command: str) -> None:
    """Record in ``directory`` that ``mmtrain <command>`` wrote it."""
    path = Path(directory) / MARKER
    tmp = path.with_name(f"{MARKER}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"command": command, "format_version": MARKER_FORMAT}) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def marker_command(directory: PathLike) -> Optional[str]:
    """The command named by ``directory``'s marker; None when it has none (or an unreadable one)."""
    try:
        record = json.loads((Path(directory) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record.get("command") if isinstance(record, dict) else None


def entry_names(directory: PathLike) -> List[str]:
    """Sorted entry names of ``directory``, sub-directories with a trailing ``/``."""
    return sorted(p.name + ("/" if p.is_dir() else "") for p in Path(directory).iterdir())


def listing(names: List[str], limit: int = 8) -> str:
    more = f", … ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _own_entry(name: str, own: Callable[[str], bool]) -> bool:
    """The marker, an entry ``own`` names, or what a killed writer of such an entry left."""
    m = _LEFTOVER.match(name)
    return name == MARKER or own(name) or bool(m and (m["name"] == MARKER or own(m["name"])))


def check_replaceable(directory: PathLike, command: str, *, own: Callable[[str], bool],
                      ours: Callable[[Path], bool], overwrite: bool, what: str = "--out",
                      overwrite_flag: str = "--overwrite") -> bool:
    """OutputError unless ``mmtrain <command>`` may replace ``directory``; whether it exists non-empty.

    ``own(name)``: whether a top-level entry name is one the command writes there (its marker, and
    the temporary names of such entries, always are). ``ours(path)``: whether the directory holds an
    output of the command by its manifest (outputs written before markers existed). Rules: a
    missing or empty directory may be written; one with entries the command does not write is
    never replaced (they are listed); one that is not recognisably ours needs ``overwrite``.
    """
    directory = Path(directory)
    if not directory.exists():
        return False
    if not directory.is_dir():
        raise OutputError(f"{what} {directory} exists and is not a directory")
    names = entry_names(directory)
    if not names:
        return False
    marked = marker_command(directory)
    foreign = [n for n in names if not _own_entry(n.rstrip("/"), own)
               or (n == MARKER and marked not in (None, command))]   # another command's output
    if foreign:
        raise OutputError(f"{what} {directory} holds entries that `mmtrain {command}` did not write "
                          f"({listing(foreign)}); it never deletes them, even with {overwrite_flag}: "
                          f"move them out of the way or choose another directory")
    if not overwrite and not (marked == command or ours(directory)):
        raise OutputError(f"{what} {directory} is not empty ({listing(names)}) and holds no output of "
                          f"`mmtrain {command}`; pass {overwrite_flag} to replace it, or choose another directory")
    return True


def check_writable_into(directory: PathLike, command: str, *, ours: Callable[[Path], bool],
                        overwrite: bool, what: str = "--out", overwrite_flag: Optional[str] = "--overwrite") -> None:
    """OutputError when ``mmtrain <command>`` should not write into the existing, non-empty
    ``directory`` (it adds its own entries there and deletes nothing it did not write): refused
    unless it holds the command's marker or output (``ours``), or ``overwrite`` is given."""
    directory = Path(directory)
    if not directory.exists():
        return
    if not directory.is_dir():
        raise OutputError(f"{what} {directory} exists and is not a directory")
    names = [n for n in entry_names(directory) if not _LEFTOVER.match(n.rstrip("/"))]
    if not names or overwrite or marker_command(directory) == command or ours(directory):
        return
    hint = (f"pass {overwrite_flag} to write into it anyway (nothing it holds is deleted), or choose "
            "another directory") if overwrite_flag else "choose another directory"
    raise OutputError(f"{what} {directory} is not empty ({listing(names)}) and holds no output of "
                      f"`mmtrain {command}`; {hint}")


# --------------------------------------------------------------------------------------------
# One writer at a time
# --------------------------------------------------------------------------------------------


def lock_path(target: PathLike) -> Path:
    target = Path(target)
    return target.with_name(f".{target.name}.lock")


def _holder(path: Path) -> str:
    """``pid N`` of the lock's holder, read from the lock file (which it writes right after locking:
    a moment later when it is still empty)."""
    import time

    for attempt in range(5):
        try:
            words = path.read_text(encoding="utf-8", errors="replace").split()
        except OSError:
            words = []
        if words and words[0].isdigit():
            return f"pid {words[0]}"
        time.sleep(0.05 * (attempt + 1))
    return "pid unknown"


@contextlib.contextmanager
def output_lock(target: PathLike, command: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``target`` (a directory, existing or not) while the block runs.

    The lock is an ``flock`` on the sibling ``.NAME.lock``, which holds the holder's pid and is
    removed on release. A second writer gets an OutputError naming the holder at once.
    """
    import fcntl

    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(path, "creating the lock file", kept=target) from None
            if exc.errno == errno.EISDIR:
                raise OutputError(f"{path} is a directory where mmtrain keeps the lock of {Path(target)}; "
                                  "remove it and run again") from None
            if exc.errno == errno.ELOOP:
                raise OutputError(f"{path} is a symbolic link; mmtrain does not write its lock file through "
                                  "a link (it would overwrite what it points at). Remove it and run again") from None
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            # a directory we may write into whose parent we may not: as before locks existed
            _warn(f"cannot create {path} ({exc.strerror}): concurrent writers to {Path(target)} are not serialised")
            yield path
            return
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:   # a planted hard link: never truncate it
            os.close(fd)
            raise OutputError(f"{path} is a hard link to another file; mmtrain does not write its lock file "
                              "through a link (it would overwrite that file). Remove it and run again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"{Path(target)} is being written by another mmtrain process ({_holder(path)}, "
                              f"lock {path}); wait for it to finish or choose another directory") from None
        except OSError as exc:   # a filesystem without flock: go on unserialised, and say so
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            _warn(f"cannot lock {path} ({exc.strerror}): concurrent writers to {Path(target)} are not serialised")
            break
        # A releasing holder unlinks the file: a lock on an unlinked inode protects nothing, retry.
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} mmtrain {command}\n".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Atomic replacement
# --------------------------------------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "arm64": 276, "ppc64le": 357, "s390x": 347}
# errno of a kernel or filesystem that cannot exchange two names: fall back to two renames
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM}


def exchange(a: PathLike, b: PathLike) -> None:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); OSError (ENOSYS
    elsewhere) when it cannot."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "renameat2 is Linux only")
    libc = ctypes.CDLL(None, use_errno=True)
    src, dst = os.fsencode(str(a)), os.fsencode(str(b))
    if hasattr(libc, "renameat2"):   # glibc >= 2.28
        rc = libc.renameat2(ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(src), ctypes.c_int(_AT_FDCWD),
                            ctypes.c_char_p(dst), ctypes.c_uint(_RENAME_EXCHANGE))
    elif platform.machine() in _SYS_RENAMEAT2:
        rc = libc.syscall(ctypes.c_long(_SYS_RENAMEAT2[platform.machine()]), ctypes.c_long(_AT_FDCWD),
                          ctypes.c_char_p(src), ctypes.c_long(_AT_FDCWD), ctypes.c_char_p(dst),
                          ctypes.c_ulong(_RENAME_EXCHANGE))
    else:
        raise OSError(errno.ENOSYS, "no renameat2 on this machine")
    if rc != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def old_name(final: Path, pid: Optional[int] = None) -> Path:
    return final.with_name(f".{final.name}.old-{os.getpid() if pid is None else pid}")


def tmp_name(final: PathLike, pid: Optional[int] = None) -> Path:
    """``.NAME.tmp-PID`` beside ``final``: where a command builds the new output."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid() if pid is None else pid}")


def publish_dir(new: PathLike, final: PathLike) -> None:
    """Put the complete directory ``new`` at ``final``; an older ``final`` is deleted after.

    With the exchange, ``final`` names the old or the new directory at every instant. Without it,
    the old one is renamed to ``.NAME.old-PID`` first: a kill between the two renames leaves that
    copy, which :func:`clean_stale` restores on the next run.
    """
    new, final = Path(new), Path(final)
    if not os.path.lexists(final):
        os.rename(new, final)
        return
    try:
        exchange(new, final)
    except OSError as exc:
        if exc.errno not in _NO_EXCHANGE:
            raise
        old = old_name(final)
        os.rename(final, old)
        os.rename(new, final)
        # Deleted under the temporary name: an interrupted delete must not look like an old
        # output waiting to be restored.
        os.rename(old, new)
        shutil.rmtree(new, ignore_errors=True)
        return
    shutil.rmtree(new, ignore_errors=True)   # it now holds the old output




def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # another user's live process
    return True


def clean_stale(final: PathLike, log: Callable[[str], None] = _warn) -> List[Path]:
    """Finish what killed writers of ``final`` left beside it; the paths removed or restored.

    Call it only while holding :func:`output_lock` on ``final`` (or on the directory that holds
    it): then no live mmtrain writes these names, and a leftover whose pid is not alive on this
    host is stale. This process's own pid counts as stale too (an earlier process of the same
    pid, as in a fresh container), since it has not written anything yet when this runs.
    A ``.NAME.old-PID`` with no ``NAME`` is the only copy of the old output: it is restored.
    """
    final = Path(final)
    leftovers = []
    for path in final.parent.glob(f".{glob_escape(final.name)}.*-*"):
        m = _LEFTOVER.match(path.name)
        if m and m["name"] == final.name:
            pid = int(m["pid"])
            if pid == os.getpid() or not _alive(pid):
                leftovers.append((m["kind"], pid, path))
    done = []
    for kind, pid, path in sorted(leftovers, key=lambda x: (x[0] != "old", -x[2].lstat().st_mtime_ns)):
        if path.is_symlink() or not path.is_dir():   # mmtrain leaves directories only: not its own
            path.unlink()
            log(f"removed {path}, which is not a directory mmtrain left (a link or a file planted there)")
        elif kind == "old" and not os.path.lexists(final):
            os.rename(path, final)
            log(f"restored {final} from {path.name}: a run (pid {pid}) was killed while replacing it")
        else:
            shutil.rmtree(path, ignore_errors=True)
            if os.path.lexists(path):
                continue
            log(f"removed {path}, left by a killed run (pid {pid})")
        done.append(path)
    return done


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def leftover_targets(directory: PathLike, pattern: str = "*") -> List[Path]:
    """The final paths in ``directory`` (names matching ``pattern``) that have leftovers beside them."""
    directory = Path(directory)
    names = set()
    for path in directory.glob(".*-*"):
        m = _LEFTOVER.match(path.name)
        if m and Path(m["name"]).match(pattern):
            names.add(m["name"])
    return [directory / n for n in sorted(names)]


# --------------------------------------------------------------------------------------------
# Digests
# --------------------------------------------------------------------------------------------

DIGEST_CHUNK = 8 << 20   # bytes per read: one pass over the file, never a whole-file copy in memory


def sha256_file(path: PathLike) -> Tuple[int, str]:
    """(size in bytes, sha256 hex digest) of a file, read in one chunked pass (~1 GB/s per core)."""
    digest, size = hashlib.sha256(), 0
    buffer = bytearray(DIGEST_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
            size += n
    return size, digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Full disk
# --------------------------------------------------------------------------------------------


def is_disk_full(exc: BaseException) -> bool:
    """An OSError ENOSPC / EDQUOT, or a library error that wraps one (safetensors' SafetensorError
    carries the OS message only)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text or "os error 28" in text


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: PathLike) -> int:
    """Free bytes on the filesystem of ``path`` (or of its nearest existing ancestor)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def disk_full_error(path: PathLike, doing: str, needed: Optional[int] = None,
                    kept: Optional[PathLike] = None, free_at_start: Optional[int] = None) -> OutputError:
    """The one-line error of a full disk: the path, what was being written, the space needed (when
    known) and free, and that ``kept`` (the old output) is untouched."""
    free = free_bytes(path)
    if needed is not None:
        space = f"needs about {human_bytes(needed)}, {human_bytes(free)} free"
    elif free_at_start is not None:
        space = f"{human_bytes(free_at_start)} free when it started, {human_bytes(free)} now"
    else:
        space = f"{human_bytes(free)} free now"
    keep = f"; {kept} is as it was" if kept is not None else ""
    return OutputError(f"{path}: no space left on device while {doing} ({space}){keep}. Free some space "
                       "or write to another filesystem, then run the command again")


def check_free_space(path: PathLike, needed: int, doing: str, kept: Optional[PathLike] = None) -> None:
    """OutputError before writing when the filesystem of ``path`` has less than ``needed`` bytes free."""
    if free_bytes(path) < needed:
        raise disk_full_error(path, doing, needed=needed, kept=kept)

