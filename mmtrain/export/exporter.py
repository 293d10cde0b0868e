"""`mmtrain export`: a DeepSpeed checkpoint (any ZeRO stage, any world size) -> a verified bundle;
`mmtrain export-embedder`: the same for a retrieval run, plus its embedder settings (``--format
sentence-transformers``: the bundle is also a sentence-transformers model folder).

Steps: find the checkpoint (run dir, checkpoints dir or ``step_XXXXXXXX`` dir; ``--tag``), check
that it was completely written and is intact (every file's size and sha256 against its manifest,
every ``.pt`` file loadable with ``weights_only=True``), rebuild the fp32 weights (ZeRO 0: the
module state in ``mp_rank_00_model_states.pt``; ZeRO 1-3: DeepSpeed's ``zero_to_fp32`` over every
rank's optimizer partition), load them into the model described by the checkpoint's own resolved
config, write the bundle (:mod:`mmtrain.export.bundle`) into a temporary sibling of ``--out``, reload it with
:func:`mmtrain.export.bundle.load_pretrained` into a fresh model and compare its logits on a fixed batch
with the checkpoint model's. Only a verified bundle is moved to ``--out``, in one atomic swap
(:func:`mmtrain.files.publish_dir`: an old bundle there is deleted only after), under a lock on
``--out``; a ``--out`` holding anything but a bundle's files is never replaced.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from mmtrain import files
from mmtrain.data.progress import add_quiet_argument, progress_bar
from mmtrain.export import bundle as B
from mmtrain.export import hf as HF
from mmtrain.export.hf import EMBEDDER_KINDS, write_sentence_transformers
from mmtrain import checkpoint_files as ckpt

MODEL_STATES = "mp_rank_00_model_states.pt"          # ZeRO 0-2: the full module (+ client state)
ZERO3_MODEL_STATES = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
OPTIM_STATES_GLOB = "*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"   # bf16_ prefix when bf16
CLIENT_KEYS = ("step", "tokens_seen", "config", "tokenizer_hash", "vocab_size")
FP32_TOLERANCE = 1e-6


class ExportError(ValueError):
    """The checkpoint cannot be exported; the message names the path and what was expected."""


@dataclass
class Checkpoint:
    root: Path              # <run_dir>/checkpoints
    tag: str                # step_XXXXXXXX
    zero_stage: int
    world_size: int
    states: Dict[str, Any]  # rank 0's model-states file (DeepSpeed keys + mmtrain client state)

    @property
    def path(self) -> Path:
        return self.root / self.tag

    @property
    def config(self) -> Dict[str, Any]:
        """The run's config, with what the task recorded for export (``export``: a retrieval run's
        model section, tokenizer and embedder) in the places export reads them."""
        config, extra = self.states["config"], self.states.get("export") or {}
        if not extra:
            return config
        return {**config, "model": extra["model"], "embedder": extra.get("embedder"),
                "data": {**config.get("data", {}), "tokenizer": extra["tokenizer"]}}

    @property
    def run_dir(self) -> Optional[Path]:
        return self.root.parent if self.root.name == ckpt.CHECKPOINT_SUBDIR else None


# --------------------------------------------------------------------------------------------
# Finding and checking the checkpoint
# --------------------------------------------------------------------------------------------


def _listing(path: Path, limit: int = 20) -> str:
    if not path.is_dir():
        return "(it does not exist)" if not path.exists() else "(it is a file)"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not names:
        return "(it is empty)"
    more = f", … ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _normalise_tag(tag: str) -> str:
    if tag.isdigit():
        return ckpt.tag_for(int(tag))
    if tag.startswith("step_") and tag[5:].isdigit():
        return ckpt.tag_for(int(tag[5:]))
    raise ExportError(f"--tag: expected 'latest', step_N or N, got {tag!r}")


def locate(path: str, tag: Optional[str] = None) -> Tuple[Path, str]:
    """``(checkpoints root, tag)`` for a run dir, a checkpoints dir or a ``step_XXXXXXXX`` dir."""
    p = Path(path).resolve()
    if p.is_dir() and (p.name.endswith(ckpt.INCOMPLETE_SUFFIX) or ".replaced" in p.name):
        complete = ", ".join(ckpt.list_tags(str(p.parent))) or "none"
        raise ExportError(f"{p} is a partially written checkpoint: every rank writes into <tag>"
                          f"{ckpt.INCOMPLETE_SUFFIX}/ and it is renamed only once all have finished (the run "
                          f"was killed while saving). Complete checkpoints next to it: {complete}")
    if p.is_dir() and p.name in ckpt.list_tags(str(p.parent)):
        if tag not in (None, "latest") and _normalise_tag(tag) != p.name:
            raise ExportError(f"{p} is checkpoint {p.name}, but --tag {tag} was given; pass the run "
                              "or checkpoints directory to choose a tag")
        return p.parent, p.name
    if (p / ckpt.CHECKPOINT_SUBDIR).is_dir():
        root = p / ckpt.CHECKPOINT_SUBDIR
    elif (p / ckpt.LATEST).is_file() or ckpt.list_tags(str(p)):
        root = p
    else:
        raise ExportError(f"no checkpoint in {p}: expected a run directory (with {ckpt.CHECKPOINT_SUBDIR}/), "
                          f"a checkpoints directory (with 'latest' and step_XXXXXXXX/) or a step_XXXXXXXX "
                          f"directory. Found: {_listing(p)}")
    tags = ckpt.list_tags(str(root))
    if tag in (None, "latest"):
        latest = ckpt.read_latest(str(root))
        if latest is None:
            raise ExportError(f"no complete checkpoint in {root}: no valid 'latest' file (it is written only "
                              f"after a checkpoint is complete). Found: {_listing(root)}"
                              + (". Pass --tag to pick a step_XXXXXXXX directory" if tags else ""))
        return root, latest
    wanted = _normalise_tag(tag)
    if wanted not in tags:
        raise ExportError(f"no checkpoint {wanted} in {root}; found: {', '.join(tags) or 'none'}")
    return root, wanted


def _check_file(path: Path) -> None:
    """A torch.save file is a zip whose directory sits at the end: a truncated file fails here."""
    try:
        with zipfile.ZipFile(path) as zf:
            zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ExportError(f"{path}: unreadable ({exc}); the checkpoint was only partially written "
                          "(the run was killed while saving?)") from None


def _load(path: Path) -> Dict[str, Any]:
    """A checkpoint ``.pt`` file, unpickled with ``weights_only=True`` and the checkpoint allowlist."""
    _check_file(path)
    try:
        return ckpt.read_pt(str(path))
    except Exception as exc:
        raise ExportError(f"{path}: cannot be loaded ({type(exc).__name__}); a damaged file, or one that "
                          "holds Python objects a checkpoint does not") from None


def open_checkpoint(root: Path, tag: str) -> Checkpoint:
    """Check that ``root/tag`` holds every file of a checkpoint written by mmtrain's trainer (all
    ranks' files present, each of the size and sha256 its manifest records, every ``.pt`` file
    loadable with ``weights_only=True``: :func:`mmtrain.train.checkpoint.verify`), before any of it
    is used; read rank 0's states."""
    path = root / tag
    try:
        ckpt.verify(str(root), tag, fix="--tag {tag}")
    except ckpt.CheckpointError as exc:
        raise ExportError(str(exc)) from None
    if (path / MODEL_STATES).is_file():
        states = _load(path / MODEL_STATES)
    elif (path / ZERO3_MODEL_STATES.format(rank=0)).is_file():
        states = _load(path / ZERO3_MODEL_STATES.format(rank=0))
    else:
        raise ExportError(f"{path}: no DeepSpeed model states ({MODEL_STATES} or "
                          f"{ZERO3_MODEL_STATES.format(rank=0)}); found: {_listing(path)}")
    missing = [k for k in CLIENT_KEYS if k not in states]
    if missing:
        raise ExportError(f"{path}: not a checkpoint of mmtrain's trainer (client state lacks "
                          f"{', '.join(missing)})")
    stage = int(states.get("ds_config", {}).get("zero_optimization", {}).get(
        "stage", states["config"]["engine"]["zero_stage"]))
    world = int(states.get("dp_world_size") or states.get("world_size") or 1)
    expected: List[str] = []
    if stage == 3:
        expected += [ZERO3_MODEL_STATES.format(rank=r) for r in range(world)]
    if stage >= 1:
        expected += [OPTIM_STATES_GLOB.format(rank=r) for r in range(world)]
    expected.append("resolved_config.yaml")   # written by rank 0 after its DeepSpeed files
    problems = []
    for pattern in expected:
        found = sorted(path.glob(pattern))
        if not found:
            problems.append(pattern)
        for f in found:
            if f.suffix == ".pt":
                _check_file(f)
    if problems:
        raise ExportError(f"{path}: partially written ZeRO-{stage} checkpoint of world size {world}: "
                          f"missing {', '.join(problems)}; found: {_listing(path)}")
    return Checkpoint(root=root, tag=tag, zero_stage=stage, world_size=world, states=states)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def fp32_state_dict(checkpoint: Checkpoint) -> Dict[str, torch.Tensor]:
    """The fp32 weights of the checkpoint.

    ZeRO 0 has no partitioned optimizer: the module state in the model-states file is the weights
    (fp32; ZeRO 0 runs only fp32). ZeRO 1-3: DeepSpeed's zero_to_fp32 merges the fp32 master
    partitions of every rank (the module state there is bf16 for bf16 runs, empty for ZeRO 3).
    """
    if checkpoint.zero_stage == 0:
        return {k: v.float() for k, v in checkpoint.states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    log = io.StringIO()   # it prints progress lines and bars: shown only when it fails
    try:   # its torch.load calls pass weights_only=False: held to weights_only=True and the allowlist
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), ckpt.weights_only_loads():
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.root), tag=checkpoint.tag)
    except Exception as exc:
        raise ExportError(f"{checkpoint.path}: DeepSpeed could not rebuild the fp32 weights "
                          f"({type(exc).__name__}: {exc})\n{log.getvalue()}") from None


def build_checkpoint_model(checkpoint: Checkpoint):
    """The model of the checkpoint's resolved config with its fp32 weights loaded (strict)."""
    from mmtrain.models import build_model

    model = build_model(checkpoint.config["model"], checkpoint.states["vocab_size"])
    from mmtrain.models.embedding import lm_state_dict

    # a retrieval run trained an Embedder: its LM's weights (the learned temperature is in the embedder settings)
    state = lm_state_dict(fp32_state_dict(checkpoint))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{checkpoint.path}: weights do not fit the model of its resolved config: {exc}") from None
    return model.eval()


# --------------------------------------------------------------------------------------------
# Tokenizer and training summary
# --------------------------------------------------------------------------------------------


def find_tokenizer(checkpoint: Checkpoint, override: Optional[str] = None) -> Path:
    """The tokenizer the checkpoint was trained with (sha256 must equal the recorded hash)."""
    from mmtrain.data.tokenizer import load_tokenizer

    data, n_ctx = checkpoint.config["data"], checkpoint.config["model"]["n_ctx"]
    candidates = [override] if override else [data.get("tokenizer") or None]
    remote_copies = []
    if not override:
        from omegaconf import OmegaConf

        from mmtrain.data.sources import sources_of

        # the first (or only) dataset's tokenizer; a URL's is in its cache, or fetched into it
        src = sources_of(OmegaConf.create({"streams": [], "cache_dir": "", **data}))[0]
        candidates += [os.path.join(src.local, f"ctx{n_ctx}", B.TOKENIZER_NAME)]
        if src.remote:
            remote_copies.append((src, os.path.join(src.local, f"ctx{n_ctx}", B.TOKENIZER_NAME)))
        else:
            candidates.append(os.path.join(src.local, B.TOKENIZER_NAME))
    for src, target in remote_copies:
        if not os.path.isfile(target):
            from mmtrain.data import remote as R
            from mmtrain.data.errors import DataError

            try:
                R.claim_cache(src.local, src.url)
                R.download(R.child(src.url, f"ctx{n_ctx}", B.TOKENIZER_NAME), target)
            except DataError as exc:
                raise ExportError(f"cannot fetch the tokenizer of {checkpoint.path}: {exc}") from None
    tried = []
    for candidate in filter(None, candidates):
        path = Path(candidate)
        if not path.is_file():
            tried.append(f"{path} (missing)")
            continue
        sha = load_tokenizer(path).sha256
        if sha == checkpoint.states["tokenizer_hash"]:
            return path
        tried.append(f"{path} (sha256 {sha[:12]}…, not the checkpoint's)")
    raise ExportError(f"cannot find the tokenizer of {checkpoint.path} (sha256 "
                      f"{checkpoint.states['tokenizer_hash'][:12]}…); tried: {'; '.join(tried)}. "
                      "Pass --tokenizer <file.model>")


def _last_metrics(run_dir: Optional[Path], step: int) -> Dict[str, float]:
    """Last train loss and eval losses recorded at or before ``step`` in metrics.jsonl."""
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return {}
    out: Dict[str, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step", 0) > step:
            continue
        for key, value in record.items():
            if key == "loss":
                out["final_train_loss"] = value
            elif key.startswith("eval_loss_ctx"):
                out[key] = value
    return out


def summaries(checkpoint: Checkpoint) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(source, training) dicts recorded in config.json and the model card."""
    s, cfg = checkpoint.states, checkpoint.config
    t, e = cfg["train"], cfg["engine"]
    source = {"checkpoint": str(checkpoint.path), "tag": checkpoint.tag, "step": int(s["step"]),
              "tokens_seen": int(s["tokens_seen"]), "zero_stage": checkpoint.zero_stage,
              "world_size": checkpoint.world_size, "precision": e["precision"],
              "deepspeed_version": str(s.get("ds_version", "?"))}
    training = {"steps_done": int(s["step"]), "steps_planned": t["steps"], "tokens_seen": int(s["tokens_seen"]),
                "global_batch_size": t["global_batch_size"], "lr": t["lr"], "schedule": t["schedule"],
                "warmup_steps": t["warmup_steps"], "weight_decay": t["weight_decay"], "seed": t["seed"],
                "shard_dir": cfg["data"]["shard_dir"]}
    training.update(_last_metrics(checkpoint.run_dir, int(s["step"])))
    return source, training


# --------------------------------------------------------------------------------------------
# Export + verification
# --------------------------------------------------------------------------------------------


def verification_batch(model, batch: int = 4, seed: int = 0) -> torch.Tensor:
    """A fixed [batch, n_ctx] batch of token ids (seeded, independent of the global RNG)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.vocab_size, (batch, model.n_ctx), generator=gen)


def _rounded_copy(model, dtype: torch.dtype):
    """The model with its weights rounded to ``dtype`` (computing in fp32), for a bf16 reference."""
    import copy

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(dtype).float())
    return rounded


@torch.no_grad()
def verify_bundle(bundle_dir: Path, reference, dtype: str) -> Dict[str, Any]:
    """Reload the bundle into a fresh model and compare its logits with ``reference``'s."""
    ids = verification_batch(reference)
    expected_model = reference if dtype == "fp32" else _rounded_copy(reference, B.DTYPES[dtype])
    expected = expected_model(ids).logits
    reloaded = B.load_pretrained(bundle_dir, verify=False)   # digests were just taken from these files
    got = reloaded(ids).logits
    diff = float((got - expected).abs().max())
    result = {"tokens": ids.numel(), "reference": "fp32" if dtype == "fp32" else f"fp32 (rounded to {dtype})",
              "max_abs_diff": diff, "tolerance": FP32_TOLERANCE}
    if dtype != "fp32":
        result["max_abs_diff_vs_fp32"] = float((got - reference(ids).logits).abs().max())
    if not diff <= FP32_TOLERANCE:
        raise ExportError(f"verification failed: logits of the reloaded bundle differ from the checkpoint "
                          f"model's by {diff:.3g} (> {FP32_TOLERANCE:g}) on a fixed batch of {ids.numel()} tokens")
    B.load_bundle_tokenizer(bundle_dir)
    return result


#: Top-level entries a bundle may hold (mmtrain, Hugging Face and sentence-transformers files).
BUNDLE_ENTRIES = {B.CONFIG_NAME, B.WEIGHTS_NAME, B.INDEX_NAME, B.TOKENIZER_NAME, B.CARD_NAME, HF.MODELING_FILE,
                  HF.TOKENIZATION_FILE, HF.TOKENIZER_CONFIG_FILE, HF.SPECIAL_TOKENS_FILE, HF.GENERATION_CONFIG_FILE,
                  HF.ST_MODULES_FILE, HF.ST_CONFIG_FILE, HF.ST_TRANSFORMER_CONFIG_FILE, "1_Pooling",
                  "1_MmtrainPooling", "2_Normalize"}
_WEIGHT_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def _bundle_entry(name: str) -> bool:
    return name in BUNDLE_ENTRIES or bool(_WEIGHT_SHARD.match(name))


def _is_bundle(directory: Path) -> bool:
    """A bundle written by `mmtrain export`: config.json with an "mmtrain" section."""
    try:
        return "mmtrain" in json.loads((directory / B.CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def _check_out(out: Path, overwrite: bool, command: str = "export") -> None:
    """ExportError / OutputError unless ``out`` may receive the bundle: new or empty, or, with
    ``overwrite``, a directory holding nothing but a bundle's files (anything else is never deleted)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    non_empty = files.check_replaceable(out, command, own=_bundle_entry, ours=_is_bundle, overwrite=overwrite)
    if non_empty and not overwrite:
        raise ExportError(f"--out {out} exists and is not empty ({_listing(out, 8)}); pass --overwrite to "
                          "replace it, or choose another directory")


FORMATS = ("mmtrain", "sentence-transformers")


def export(path: str, out: str, tag: Optional[str] = None, dtype: str = "fp32",
           max_shard_size: int = B.DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
           tokenizer: Optional[str] = None, embedder: Optional[Dict[str, Any]] = None,
           fmt: str = "mmtrain", progress: bool = True) -> Dict[str, Any]:
    """Export a checkpoint to a verified bundle in ``out``; returns the bundle's config.json dict.
    ``embedder``: a retrieval run's embedder settings, stored in config.json before publishing.
    ``fmt="sentence-transformers"`` (embedders only): the bundle is also a sentence-transformers
    model folder (:func:`mmtrain.export.hf.write_sentence_transformers`)."""
    if dtype not in B.DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(B.DTYPES)}, got {dtype!r}")
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "sentence-transformers" and embedder is None:
        raise ExportError("--format sentence-transformers needs an embedder: export a retrieval run with "
                          "`mmtrain export-embedder`")
    out_path = Path(out).resolve()
    command = "export" if embedder is None else "export-embedder"
    root, tag = locate(path, tag)
    if out_path == root / tag or out_path in (root / tag).parents:
        raise ExportError(f"--out {out_path} contains the checkpoint {root / tag}; choose a directory outside it")
    _check_out(out_path, overwrite, command)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with files.output_lock(out_path, command):
        files.clean_stale(out_path)
        _check_out(out_path, overwrite, command)   # again, now that no other writer can change it
        return _export_locked(root, tag, out_path, dtype=dtype, max_shard_size=max_shard_size,
                              tokenizer=tokenizer, embedder=embedder, fmt=fmt, progress=progress)


def _bundle_bytes(model, dtype: str, tokenizer_path: Path) -> int:
    """About what the bundle takes on disk: the weights in ``dtype``, the tokenizer, 1 MiB of the rest."""
    weights = sum(p.numel() for p in model.state_dict().values()) * B.DTYPES[dtype].itemsize
    return weights + tokenizer_path.stat().st_size + (1 << 20)


def _export_locked(root: Path, tag: str, out_path: Path, *, dtype, max_shard_size, tokenizer, embedder, fmt,
                   progress) -> Dict[str, Any]:
    """:func:`export` of checkpoint ``root/tag`` once ``out_path`` is checked and locked: the bundle
    is built in ``.NAME.tmp-PID``, verified, and swapped in atomically
    (:func:`mmtrain.files.publish_dir`)."""
    checkpoint = open_checkpoint(root, tag)
    with progress_bar(progress, total=4, desc="export", unit=" stage") as bar:
        bar.set_postfix_str("reading the checkpoint")
        model = build_checkpoint_model(checkpoint)
        if fmt == "sentence-transformers" and model.kind not in EMBEDDER_KINDS:
            raise ExportError(f"{checkpoint.path}: a {model.kind} cannot be exported for sentence-transformers: its "
                              "embeddings depend on the padding of the batch (kinds that can: "
                              f"{', '.join(EMBEDDER_KINDS)})")
        tokenizer_path = find_tokenizer(checkpoint, tokenizer)
        source, training = summaries(checkpoint)
        tmp = files.tmp_name(out_path)
        shutil.rmtree(tmp, ignore_errors=True)
        kept = out_path if out_path.exists() else None
        needed = _bundle_bytes(model, dtype, tokenizer_path)
        files.check_free_space(out_path.parent, needed, "writing the bundle", kept=kept)
        bar.update(1)
        try:
            bar.set_postfix_str("writing the bundle")
            config = B.write_bundle(model, tmp, tokenizer_path, dtype=dtype, max_shard_size=max_shard_size,
                                    source=source, training=training)
            bar.update(1)
            bar.set_postfix_str("verifying the logits")
            config["mmtrain"]["verification"] = verify_bundle(tmp, model, dtype)
            bar.update(1)
            bar.set_postfix_str("publishing")
            if embedder is not None:
                config["mmtrain"]["embedder"] = embedder
            B.rewrite_config(tmp, config)
            if fmt == "sentence-transformers":
                write_sentence_transformers(tmp, config)
            files.publish_dir(tmp, out_path)
            bar.update(1)
        except Exception as exc:   # safetensors wraps the OS error in its own SafetensorError
            if not files.is_disk_full(exc):
                raise
            raise files.disk_full_error(getattr(exc, "filename", None) or tmp, "writing the bundle",
                                        needed=needed, kept=kept) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return config


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _run(args) -> int:
    try:
        config = export(args.checkpoint, args.out, tag=args.tag, dtype=args.dtype,
                        max_shard_size=B.parse_size(args.max_shard_size), overwrite=args.overwrite,
                        tokenizer=args.tokenizer, progress=not args.quiet)
    except (ExportError, B.BundleError, FileNotFoundError) as exc:
        print(f"mmtrain export: {exc}", file=sys.stderr)
        return 2
    m = config["mmtrain"]
    v = m["verification"]
    print(f"exported {m['source']['checkpoint']} (step {m['source']['step']}, ZeRO-{m['source']['zero_stage']}, "
          f"world size {m['source']['world_size']}) -> {Path(args.out).resolve()}")
    print(f"  {m['model']['kind']}: {m['num_params']:,} parameters, {m['dtype']}, "
          f"files: {', '.join(sorted(p.name for p in Path(args.out).iterdir()))}")
    print(f"  verified: reloaded logits match the checkpoint's (max |diff| {v['max_abs_diff']:.3g} "
          f"on {v['tokens']} tokens)")
    return 0


def _export_embedder(args) -> int:
    """`mmtrain export` of a retrieval run, plus the embedder settings in config.json."""
    try:
        checkpoint = open_checkpoint(*locate(args.checkpoint, args.tag))
        info = checkpoint.states.get("embedder")
        if info is None:
            raise ExportError(f"{checkpoint.path}: not a retrieval checkpoint (no embedder settings); "
                              "use `mmtrain export`")
        config = export(args.checkpoint, args.out, tag=args.tag, dtype=args.dtype, overwrite=args.overwrite,
                        embedder=info, fmt=args.format, progress=not args.quiet)
    except (ExportError, B.BundleError, FileNotFoundError) as exc:
        print(f"mmtrain export-embedder: {exc}", file=sys.stderr)
        return 2
    what = " as a sentence-transformers model" if args.format == "sentence-transformers" else ""
    print(f"exported embedder ({info['pooling']} pooling, step {config['mmtrain']['source']['step']}){what} "
          f"-> {args.out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="DeepSpeed checkpoint (ZeRO 0-3) -> verified safetensors bundle",
        description="Turn a training checkpoint into model.safetensors + config.json + tokenizer.model + "
                    "model_card.md, then reload it and check the logits against the checkpoint's.")
    p.add_argument("checkpoint", help="run directory, its checkpoints/ directory, or a step_XXXXXXXX directory")
    p.add_argument("--out", required=True, help="bundle directory to write (must be new or empty)")
    p.add_argument("--tag", default=None, help="latest (default), step_N or N")
    p.add_argument("--dtype", choices=sorted(B.DTYPES), default="fp32", help="stored weight dtype (default fp32)")
    p.add_argument("--max-shard-size", default="2GB",
                   help="split the weights into shards of at most this size (default 2GB)")
    p.add_argument("--tokenizer", default=None,
                   help="the tokenizer .model, when it is no longer where the training config says")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    add_quiet_argument(p)
    p.set_defaults(func=_run)

    p = subparsers.add_parser(
        "export-embedder", help="export a retrieval run (mmtrain export + embedder settings in config.json)")
    p.add_argument("checkpoint", help="retrieval run directory, its checkpoints/ or a step_XXXXXXXX directory")
    p.add_argument("--out", required=True)
    p.add_argument("--tag", default=None)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--format", choices=FORMATS, default="mmtrain",
                   help="mmtrain: the bundle (default); sentence-transformers: the bundle that is also a "
                        "folder SentenceTransformer(path, trust_remote_code=True) loads (the same embeddings)")
    p.add_argument("--overwrite", action="store_true")
    add_quiet_argument(p)
    p.set_defaults(func=_export_embedder)
