"""Commands that write a directory never delete what they did not write, replace it atomically,
clean up after killed runs, refuse a second writer, and report a full disk (exit 2) with the old
output intact. Real commands through ``mmtrain.cli.main``; kills are real ``os._exit`` calls."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from mmtrain import cli
from mmtrain import files as F
from mmtrain.data.tokenizer import DEMO_TOKENIZER

PAIRS_CONFIG = str(ROOT / "configs" / "pairs" / "demo.yaml")
FROZEN_CONFIG = str(ROOT / "configs" / "frozen_retrieval" / "demo.yaml")


def snapshot(directory: Path) -> dict:
    """{relative path: bytes (files) or None (dirs)} of everything under ``directory``."""
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(directory.rglob("*"))}


def foreign_dir(path: Path) -> Path:
    """A directory mmtrain did not write: notes, and a copy of pretraining shards' names."""
    (path / "notes").mkdir(parents=True)
    (path / "notes" / "todo.txt").write_text("mine")
    (path / "ctx32").mkdir()
    (path / "ctx32" / "meta.json").write_text("{}")
    shutil.copyfile(DEMO_TOKENIZER, path / "tokenizer.model")
    return path


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def prepare_args(out: Path, *extra: str) -> list:
    return ["prepare", "--input", "demo", "--max-docs", "120", "--out", str(out), "--n-ctx", "32",
            "--tokenizer", str(DEMO_TOKENIZER), "--num-proc", "1", "--quiet", *extra]


def pairs_args(out: Path, *extra: str) -> list:
    return ["prepare-pairs", "--config", PAIRS_CONFIG, "--out", str(out), "--quiet", *extra,
            f"tokenizer={DEMO_TOKENIZER}", "n_ctx=32", "max_pairs=200", "test_fraction=0.2"]


# --------------------------------------------------------------------------------------------
# Never delete what we did not write
# --------------------------------------------------------------------------------------------


def test_prepare_pairs_never_replaces_a_directory_it_did_not_write(tmp_path, capsys):
    out = foreign_dir(tmp_path / "d")
    before = snapshot(out)
    assert cli.main(pairs_args(out)) == 2
    err = capsys.readouterr().err
    assert "ctx32/, notes/" in err and "never deletes them" in err and "Traceback" not in err
    assert cli.main(pairs_args(out, "--overwrite")) == 2          # not even when asked to
    assert "ctx32/, notes/" in capsys.readouterr().err
    assert snapshot(out) == before

    # a non-empty directory of nothing but prepare-pairs' names, without its meta.json: --overwrite
    partial = tmp_path / "p"
    (partial / "train").mkdir(parents=True)
    assert cli.main(pairs_args(partial)) == 2
    assert "holds no output of `mmtrain prepare-pairs`; pass --overwrite" in capsys.readouterr().err
    assert cli.main(pairs_args(partial, "--overwrite")) == 0
    assert F.marker_command(partial) == "prepare-pairs"
    assert cli.main(pairs_args(partial, "seed=1")) == 0           # its own output: another recipe replaces it
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no tmp, old or lock left


def test_export_never_replaces_a_directory_holding_other_files(exported_bundles, trained_runs, tmp_path, capsys):
    out = tmp_path / "b"
    shutil.copytree(exported_bundles["mixer_zero1"], out)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert cli.main(["export", str(trained_runs["mixer_zero1"]), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "did not write (notes.txt)" in err and "even with --overwrite" in err
    assert snapshot(out) == before


def test_prepare_never_replaces_a_ctx_dir_holding_other_files_nor_writes_into_a_foreign_out(tmp_path, capsys):
    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    (home / "notes" / "todo.txt").write_text("mine")
    assert cli.main(prepare_args(home)) == 2
    assert "holds no output of `mmtrain prepare`; pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in home.iterdir()) == ["notes"]

    shards = tmp_path / "shards"           # an out with a ctx32/ of someone else's files
    (shards / "ctx32").mkdir(parents=True)
    (shards / "ctx32" / "mine.txt").write_text("mine")
    assert cli.main(prepare_args(shards, "--overwrite")) == 2
    assert "ctx32 holds entries that `mmtrain prepare` did not write (mine.txt)" in capsys.readouterr().err
    assert (shards / "ctx32" / "mine.txt").read_text() == "mine"


def test_frozen_retrieval_never_writes_into_a_foreign_out_dir_or_over_a_foreign_scorer(
        exported_bundles, tmp_path, capsys):
    pairs = tmp_path / "pairs"
    assert cli.main(pairs_args(pairs)) == 0
    base = ["frozen-retrieval", "--config", FROZEN_CONFIG, f"embeddings.bundle={exported_bundles['mixer_zero1']}",
            f"embeddings.pairs={pairs}", "model.n_candidates=8", "--quiet"]
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    assert cli.main([*base, f"out_dir={home}"]) == 2
    assert "holds no output of `mmtrain frozen-retrieval`; choose another directory" in capsys.readouterr().err
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]
    run = tmp_path / "run"                 # an out_dir of its own whose scorer/ holds someone's file
    (run / "scorer").mkdir(parents=True)
    (run / "scorer" / "mine.txt").write_text("mine")
    assert cli.main([*base, f"out_dir={run}"]) == 2
    assert "scorer holds entries that `mmtrain frozen-retrieval` did not write (mine.txt)" in capsys.readouterr().err
    assert (run / "scorer" / "mine.txt").read_text() == "mine" and not (run / "embeddings").exists()


# --------------------------------------------------------------------------------------------
# Atomic replacement, and what a killed run leaves
# --------------------------------------------------------------------------------------------


def test_publishing_swaps_the_directories_in_one_exchange(tmp_path):
    final, new = tmp_path / "out", tmp_path / ".out.tmp-1"
    for d, text in ((final, "old"), (new, "new")):
        d.mkdir()
        (d / "f").write_text(text)
    F.exchange(new, final)                 # renameat2(RENAME_EXCHANGE) works on this filesystem
    assert (final / "f").read_text() == "new" and (new / "f").read_text() == "old"
    F.publish_dir(new, final)
    assert (final / "f").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]



def test_publishing_without_the_exchange_takes_two_renames_and_leaves_nothing(tmp_path, monkeypatch):
    def unsupported(a, b):
        raise OSError(errno.EINVAL, "no RENAME_EXCHANGE on this filesystem")

    monkeypatch.setattr(F, "exchange", unsupported)
    final, new = tmp_path / "out", tmp_path / ".out.tmp-1"
    for d, text in ((final, "old"), (new, "new")):
        d.mkdir()
        (d / "f").write_text(text)
    F.publish_dir(new, final)
    assert (final / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


KILL_BETWEEN_RENAMES = """
import errno, os, sys
from mmtrain import files as F

def unsupported(a, b):
    raise OSError(errno.EINVAL, "no RENAME_EXCHANGE here")

renames = []
real = os.rename
def rename(a, b):
    renames.append(a)
    if len(renames) == 2:
        os._exit(137)                      # killed after moving the old output aside
    real(a, b)

F.exchange, os.rename = unsupported, rename
F.publish_dir(sys.argv[1], sys.argv[2])
"""


def test_a_kill_between_the_two_renames_is_rolled_back_by_the_next_run(tmp_path, capsys):
    """Where the exchange is unsupported, publishing takes two renames; a kill between them leaves
    the old output only as .NAME.old-PID: the next prepare restores it (and keeps it: same recipe)."""
    out = tmp_path / "shards"
    assert cli.main(prepare_args(out)) == 0
    ctx = out / "ctx32"
    before = snapshot(ctx)
    new = out / f".ctx32.tmp-{os.getpid()}"
    shutil.copytree(ctx, new)
    (new / "meta.json").write_text("{}")
    proc = subprocess.Popen([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(new), str(ctx)], cwd=ROOT)
    assert proc.wait(timeout=60) == 137
    assert not ctx.exists() and (out / f".ctx32.old-{proc.pid}").is_dir()   # the only copy of the old shards
    capsys.readouterr()
    assert cli.main(prepare_args(out)) == 0
    captured = capsys.readouterr()
    assert f"restored {ctx} from .ctx32.old-{proc.pid}" in captured.err
    assert "up to date" in captured.out                  # the restored shards, not new ones
    assert snapshot(ctx) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".ctx")]


KILL_WHILE_DELETING_THE_OLD_BUNDLE = """
import os, shutil, sys
from mmtrain.export.exporter import export

real = shutil.rmtree
def rmtree(path, *args, **kwargs):
    doomed = os.path.isfile(os.path.join(path, "config.json"))   # a bundle: the old one being removed
    real(path, *args, **kwargs)
    if doomed:
        os._exit(137)                      # killed right after deleting it

shutil.rmtree = rmtree
export(sys.argv[1], sys.argv[2], overwrite=True, progress=False)
"""


def test_export_overwrite_never_leaves_a_half_bundle_at_out(exported_bundles, trained_runs, tmp_path):
    """`export --overwrite` swaps the verified bundle in before deleting the old one: killed while
    deleting, --out holds the complete new bundle (before: the old one was deleted first)."""
    from mmtrain.export import bundle as B

    out = tmp_path / "b"
    shutil.copytree(exported_bundles["mixer_zero1"], out)
    (out / "model_card.md").write_text("the old bundle")
    proc = subprocess.Popen([sys.executable, "-c", KILL_WHILE_DELETING_THE_OLD_BUNDLE,
                             str(trained_runs["mixer_zero1"]), str(out)], cwd=ROOT)
    assert proc.wait(timeout=300) == 137
    assert (out / "model_card.md").read_text() != "the old bundle"
    B.load_pretrained(out)                 # complete, and its weights match its config.json


def test_stale_siblings_are_removed_only_when_their_writer_is_gone(tmp_path, trained_runs, capsys):
    final = tmp_path / "b"
    final.mkdir()
    gone = dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (f".b.tmp-{gone}", f".b.old-{gone}", f".b.tmp-{live.pid}", f".bb.tmp-{gone}"):
            (tmp_path / name).mkdir()
        with F.output_lock(final, "test"):
            F.clean_stale(final)
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == [f".b.tmp-{live.pid}", f".bb.tmp-{gone}", "b"]   # a live writer's, another name's
    finally:
        live.kill()
        live.wait()
    # and `mmtrain export` cleans what a killed export left beside its --out
    (tmp_path / f".b.tmp-{live.pid}").rename(tmp_path / f".out.tmp-{gone}")
    assert cli.main(["export", str(trained_runs["mixer_zero1"]), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert f"removed {tmp_path / f'.out.tmp-{gone}'}" in capsys.readouterr().err
    assert not (tmp_path / f".out.tmp-{gone}").exists() and not (tmp_path / ".out.lock").exists()


def test_a_planted_link_among_the_leftovers_is_removed_never_restored_or_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    final = tmp_path / "out" / "ctx32"
    final.parent.mkdir()
    dead = 2**22 + 12345   # above the default pid_max: never a live process
    for kind in ("old", "tmp"):
        (final.parent / f".ctx32.{kind}-{dead}").symlink_to(victim)
    messages = []
    F.clean_stale(final, log=messages.append)
    assert not final.exists() and sorted(final.parent.iterdir()) == []
    assert (victim / "keep.txt").read_text() == "keep"
    assert all("not a directory mmtrain left" in m for m in messages) and len(messages) == 2


def test_an_old_copy_that_is_the_only_copy_is_restored_not_deleted(tmp_path):
    final = tmp_path / "b"
    gone = dead_pid()
    old = tmp_path / f".b.old-{gone}"
    old.mkdir()
    (old / "f").write_text("old")
    (tmp_path / f".b.tmp-{gone}").mkdir()              # the new one, possibly incomplete
    messages = []
    with F.output_lock(final, "test"):
        F.clean_stale(final, log=messages.append)
    assert (final / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert any("restored" in m for m in messages)


# --------------------------------------------------------------------------------------------
# One writer at a time
# --------------------------------------------------------------------------------------------

HOLD_LOCK = """
import sys
from mmtrain import files as F
with F.output_lock(sys.argv[1], "export"):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_second_writer_to_the_same_out_is_refused_naming_the_holder(trained_runs, tmp_path, capsys):
    out = tmp_path / "b"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli.main(["export", str(trained_runs["mixer_zero1"]), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"being written by another mmtrain process (pid {holder.pid}" in err
        assert cli.main(pairs_args(out)) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.communicate("")
    assert not out.exists() and not (tmp_path / ".b.lock").exists()


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_a_lock_file_planted_as_a_link_is_refused_and_its_target_untouched(trained_runs, tmp_path, capsys, kind):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    lock = tmp_path / ".b.lock"
    (lock.symlink_to if kind == "symlink" else lock.hardlink_to)(victim)
    assert cli.main(["export", str(trained_runs["mixer_zero1"]), "--out", str(tmp_path / "b"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{lock} is a {'symbolic link' if kind == 'symlink' else 'hard link to another file'}" in err
    assert "Traceback" not in err and victim.read_text() == "precious" and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------------------------
# Exit codes: data errors and a full disk
# --------------------------------------------------------------------------------------------


def test_prepare_and_prepare_pairs_data_errors_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    assert cli.main(["prepare", "--input", str(empty), "--out", str(tmp_path / "s"), "--tokenizer",
                     str(DEMO_TOKENIZER), "--quiet"]) == 2
    assert "error: the corpus is empty" in capsys.readouterr().err
    assert cli.main(["prepare-pairs", "--input", str(tmp_path / "missing.jsonl"), "--n-ctx", "32", "--out",
                     str(tmp_path / "p"), "--quiet", f"tokenizer={DEMO_TOKENIZER}"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def no_space(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_a_full_disk_during_prepare_is_exit_2_with_the_old_shards_intact(tmp_path, capsys, monkeypatch):
    from mmtrain.data import shards as S

    out = tmp_path / "shards"
    assert cli.main(prepare_args(out)) == 0
    before = snapshot(out / "ctx32")
    real = S.write_json_atomic

    def full(path, obj):   # the disk fills at the last write of the new shards
        if Path(path).name == S.META_NAME:
            raise no_space(path)
        return real(path, obj)

    monkeypatch.setattr(S, "write_json_atomic", full)
    capsys.readouterr()
    assert cli.main(prepare_args(out, "--overwrite", "seed=1")) == 2
    err = capsys.readouterr().err.strip()
    assert "no space left on device while writing the shards" in err and "free" in err
    assert f".ctx32.tmp-{os.getpid()}" in err and f"{out} is as it was" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert snapshot(out / "ctx32") == before
    assert not [p for p in out.iterdir() if p.name.startswith(".ctx")]
    # into a new --out: nothing is left behind, not even the directory
    assert cli.main(prepare_args(tmp_path / "new")) == 2
    assert "no space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def test_a_full_disk_during_export_is_exit_2_with_the_old_bundle_intact(exported_bundles, trained_runs, tmp_path,
                                                                        capsys, monkeypatch):
    from safetensors import SafetensorError

    from mmtrain.export import bundle as B

    out = tmp_path / "b"
    shutil.copytree(exported_bundles["mixer_zero1"], out)
    before = snapshot(out)
    run = str(trained_runs["mixer_zero1"])

    def full(state, directory, max_shard_size):   # safetensors reports the OS error in its own type
        (Path(directory) / B.WEIGHTS_NAME).write_bytes(b"\0" * 100)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(B, "save_weights", full)
    assert cli.main(["export", run, "--out", str(out), "--overwrite", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no space left on device while writing the bundle (needs about" in err and f"{out} is as it was" in err
    assert len(err.splitlines()) == 1
    monkeypatch.undo()
    monkeypatch.setattr(F, "free_bytes", lambda path: 1000)   # too little space: refused before writing
    assert cli.main(["export", run, "--out", str(out), "--overwrite", "--quiet"]) == 2
    assert "1000 B free" in capsys.readouterr().err
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# --------------------------------------------------------------------------------------------
# tensorboard.sh
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, warned", [
    (["runs"], None),
    (["runs", "--", "--bind_all"], "every interface (--bind_all)"),
    (["runs", "--", "--host", "0.0.0.0"], "0.0.0.0"),
    (["runs", "--", "--host=::"], "::"),
    (["--host", "192.168.1.5", "runs"], "192.168.1.5"),
    (["--host", "localhost", "runs", "--", "--host", "127.0.0.2", "--reload_interval", "5"], None),
])
def test_tensorboard_warns_when_asked_to_bind_beyond_loopback(args, warned):
    env = dict(os.environ, MMTRAIN_DRY_RUN="1")
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "tensorboard.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    if warned is None:
        assert proc.stderr == ""
    else:
        assert f"warning: listening on {warned}, not only on this machine" in proc.stderr
    # TensorBoard refuses --host beside --bind_all: the launcher then passes --bind_all alone
    assert ("--host" in proc.stdout.split()) == ("--bind_all" not in args)

