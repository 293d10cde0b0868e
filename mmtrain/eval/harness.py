"""`mmtrain eval-harness`: EleutherAI's lm-evaluation-harness on a bundle, offline, with mmtrain's local tasks.

A language-model bundle (mixer, Toeplitz mixer, transformer, hybrid) loads in ``transformers`` with
``trust_remote_code``, so the harness's own ``hf`` model runs it. This command builds that model with
the arguments that make the harness score a bundle the way mmtrain trained it, and runs the tasks:

* ``add_bos_token=False`` and ``prefix_token_id=<EOS>``: mmtrain never uses BOS; every document of the
  packed training data follows an EOS. Texts are encoded without special tokens, and a rolling
  perplexity window or an empty context starts from EOS (the harness's GPT-2 convention).
* ``max_length=n_ctx``: a masked mixer has a fixed context. The harness cuts a long document into
  rolling windows of at most n_ctx tokens and truncates a long multiple-choice context on the left,
  so no input is ever longer than the model.

The same run from the harness's own command line (``python -m mmtrain.eval.harness BUNDLE --print-command``
prints it for a bundle)::

    lm_eval --model hf --model_args pretrained=BUNDLE,trust_remote_code=True,add_bos_token=False,\
prefix_token_id=<EOS id>,max_length=<n_ctx>,dtype=float32 --include_path <mmtrain>/eval/harness_tasks \
--tasks mmtrain_docstrings

Shipped tasks (``mmtrain/eval/harness_tasks``), made at load time from the demo corpus's held-out
documents, i.e. the documents ``mmtrain prepare --input demo`` puts in the val split (val_fraction
0.05, seed 0), from the running interpreter's standard library, offline:

* ``mmtrain_docstrings_ppl`` (``loglikelihood_rolling``): every held-out docstring, scored whole;
  word perplexity, byte perplexity and bits per byte, as the harness reports wikitext.
  ``mmtrain eval-lm BUNDLE --text demo --held-out`` scores the same documents the same way and
  reports the same three numbers plus the token-level loss (the relation is in docs/evaluation.md).
* ``mmtrain_docstrings_summary`` (``multiple_choice``): for each held-out docstring shaped like PEP
  257 (summary line, blank line, body), 4 summary lines (its own and 3 from other held-out
  docstrings, fixed seed); the model picks the one after which the body's opening (at most
  :data:`BODY_CHARS` characters) is most likely. Accuracy; chance 25 %.
* ``mmtrain_docstrings``: both.

Any other task the harness knows (its own, or YAML files under ``--include-path``) runs too, if its
data is on this machine: nothing is downloaded (``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` are set).
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

TASKS_DIR = Path(__file__).resolve().parent / "harness_tasks"
#: The tasks (and their tag) defined in TASKS_DIR.
LOCAL_TASKS = ("mmtrain_docstrings", "mmtrain_docstrings_ppl", "mmtrain_docstrings_summary")
DEFAULT_TASKS = ("mmtrain_docstrings",)
#: The held-out documents are those of `mmtrain prepare --input demo` (configs/prepare/demo.yaml).
DEMO_VAL_FRACTION = 0.05
DEMO_SEED = 0
#: Body excerpt of the summary task: the opening of the body, cut at a word boundary.
BODY_CHARS = 300
N_CHOICES = 4
CHOICE_SEED = 1234
INSTALL_HINT = 'pip install -e ".[harness]"'


def held_out_documents(seed: int = DEMO_SEED, val_fraction: float = DEMO_VAL_FRACTION) -> List[str]:
    """The demo corpus's documents that `mmtrain prepare --input demo` holds out (its val split): the
    documents `mmtrain eval-lm --text demo --held-out` scores."""
    from mmtrain.data.demo_corpus import DEMO_INPUT
    from mmtrain.eval.lm import read_documents

    return read_documents([DEMO_INPUT], held_out=True, seed=seed, val_fraction=val_fraction)


def body_excerpt(body: str, max_chars: int = BODY_CHARS) -> str:
    """The body's first paragraph, at most ``max_chars`` characters, cut at a word boundary."""
    text = body.split("\n\n", 1)[0].strip()
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars + 1]
    return cut[:cut.rfind(" ")].rstrip() if " " in cut else text[:max_chars]


def summary_items(documents: Sequence[str], n_choices: int = N_CHOICES, seed: int = CHOICE_SEED,
                  body_chars: int = BODY_CHARS) -> List[Dict[str, Any]]:
    """Multiple-choice items: ``{"choices": ["<summary>\\n\\n", ...], "label": i, "body": excerpt}``."""
    from mmtrain.data.demo_pairs import split_docstring

    pairs = [p for p in (split_docstring(d) for d in documents) if p is not None]
    summaries = sorted({s for s, _ in pairs})
    if len(summaries) < n_choices:
        raise ValueError(f"{len(summaries)} distinct summary lines: fewer than the {n_choices} choices")
    items = []
    for index, (summary, body) in enumerate(pairs):
        rng = random.Random(f"{seed}:{index}")
        others = rng.sample([s for s in summaries if s != summary], n_choices - 1)
        label = rng.randrange(n_choices)
        choices = others[:label] + [summary] + others[label:]
        items.append({"choices": [c + "\n\n" for c in choices], "label": label, "body": body_excerpt(body, body_chars)})
    return items


def _dataset(rows: List[Dict[str, Any]]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def perplexity_dataset(**_: Any):
    """The harness's dataset of ``mmtrain_docstrings_ppl`` (``custom_dataset``)."""
    return _dataset([{"text": t} for t in held_out_documents()])


def summary_dataset(body_chars: int = BODY_CHARS, **_: Any):
    """The harness's dataset of ``mmtrain_docstrings_summary`` (``custom_dataset``; ``body_chars`` can
    come from the harness's ``--metadata '{"body_chars": N}'`` for models with a short n_ctx)."""
    return _dataset(summary_items(held_out_documents(), body_chars=int(body_chars)))


def longest_continuation(bundle: str, body_chars: int = BODY_CHARS) -> int:
    """Tokens of the longest continuation the summary task scores with this bundle's tokenizer, split
    from its context as the harness splits them (the harness requires it to fit in max_length)."""
    from mmtrain.export.bundle import load_bundle_tokenizer

    tok = load_bundle_tokenizer(bundle)
    longest = 0
    for item in summary_items(held_out_documents(), body_chars=body_chars):
        for choice in item["choices"]:
            context = choice.rstrip()
            whole = tok.encode(choice + item["body"])
            longest = max(longest, len(whole) - len(tok.encode(context)))
    return longest


def perplexity_results(doc: Dict[str, Any], results: Sequence[float]) -> Dict[str, Any]:
    """Per-document results of ``mmtrain_docstrings_ppl``: (loglikelihood, words or UTF-8 bytes)."""
    from mmtrain.eval.lm import word_count

    (loglikelihood,) = results
    n_bytes = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, word_count(doc["text"])),
            "byte_perplexity": (loglikelihood, n_bytes), "bits_per_byte": (loglikelihood, n_bytes)}


# --------------------------------------------------------------------------------------------
# Running the harness on a bundle
# --------------------------------------------------------------------------------------------

class HarnessError(Exception):
    """A bad bundle, an unknown task or a missing lm-eval install: exit 2."""


def _require_lm_eval():
    from mmtrain.export.hf import import_transformers

    try:
        import_transformers()   # a torchvision wheel built for another torch would break its model classes
        import importlib

        importlib.import_module("lm_eval.models.huggingface")   # with its imports: accelerate, peft
    except ImportError as exc:
        raise HarnessError(f"lm-evaluation-harness is not installed ({exc}); install the extra: {INSTALL_HINT}")


def model_args(bundle: str, device: str = "cpu", batch_size: int = 16) -> Dict[str, Any]:
    """The ``hf`` model arguments that score a language-model bundle as mmtrain trained it."""
    from mmtrain.eval.lm import not_a_language_model
    from mmtrain.export.bundle import read_bundle_config
    from mmtrain.export.hf import GENERATIVE_KINDS

    section = read_bundle_config(bundle)
    other = not_a_language_model(section)
    if other:
        raise HarnessError(f"{bundle} holds {other}; "
                           f"the harness scores language models ({', '.join(GENERATIVE_KINDS)} bundles "
                           f"written by `mmtrain export`)")
    eos = int(section["tokenizer"]["special_ids"]["eos"])
    return {"pretrained": str(Path(bundle).resolve()), "trust_remote_code": True, "add_bos_token": False,
            "prefix_token_id": eos, "max_length": int(section["model"]["n_ctx"]), "dtype": "float32",
            "device": device, "batch_size": batch_size}


def command_line(args: Dict[str, Any], tasks: Sequence[str], include_paths: Sequence[str],
                 metadata: Optional[Dict[str, Any]] = None) -> str:
    """The equivalent ``lm_eval`` command."""
    margs = ",".join(f"{k}={v}" for k, v in args.items() if k not in ("device", "batch_size"))
    include = " ".join(f"--include_path {p}" for p in include_paths)
    meta = f" --metadata '{json.dumps(metadata)}'" if metadata else ""
    return (f"lm_eval --model hf --model_args {margs} {include} --tasks {','.join(tasks)} "
            f"--device {args['device']} --batch_size {args['batch_size']}{meta}")


def _offline() -> None:
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")


def evaluate(bundle: str, tasks: Sequence[str] = DEFAULT_TASKS, limit: Optional[float] = None,
             batch_size: int = 16, device: str = "cpu", include_paths: Sequence[str] = (),
             seed: int = 0, metadata: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run the harness on a bundle; returns ``{"results": {task: {metric: value}}, "command": ..., ...}``.

    ``metadata``: the harness's task metadata (e.g. ``{"body_chars": 60}`` for the summary task)."""
    _offline()
    args = model_args(bundle, device, batch_size)
    metadata = dict(metadata or {})
    if any(t in ("mmtrain_docstrings", "mmtrain_docstrings_summary") for t in tasks):
        body_chars = int(metadata.get("body_chars", BODY_CHARS))
        longest = longest_continuation(bundle, body_chars)
        if longest > args["max_length"]:
            raise HarnessError(f"mmtrain_docstrings_summary: its longest scored body excerpt ({body_chars} characters) "
                               f"is {longest} tokens with this bundle's tokenizer, more than the model's n_ctx "
                               f"{args['max_length']}; shorten the excerpts, e.g. --metadata "
                               f"'{{\"body_chars\": {max(20, body_chars * args['max_length'] // (2 * longest))}}}'")
    _require_lm_eval()
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    paths = [str(TASKS_DIR)] + [str(Path(p).resolve()) for p in include_paths]
    for p in paths[1:]:
        if not Path(p).is_dir():
            raise HarnessError(f"--include-path {p}: not a directory")
    only_local = all(t in LOCAL_TASKS for t in tasks) and not include_paths
    manager = TaskManager(include_path=paths, include_defaults=not only_local, metadata=metadata or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise HarnessError(f"unknown task(s) {', '.join(unknown)}; mmtrain's tasks: {', '.join(LOCAL_TASKS)} "
                           f"(the harness's own: `lm_eval ls tasks`)")
    try:
        out = simple_evaluate(model="hf", model_args={k: v for k, v in args.items() if k not in ("device", "batch_size")},
                              tasks=list(tasks), batch_size=batch_size, device=device, limit=limit,
                              task_manager=manager, log_samples=False, bootstrap_iters=0, random_seed=seed,
                              numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                              metadata=metadata or None)
    except ConnectionError as exc:   # datasets' offline mode: a task whose data is not on this machine
        raise HarnessError(f"a task's data is not on this machine, and nothing is downloaded: {exc}")
    results = {}
    for task, metrics in out["results"].items():
        clean = {}
        for key, value in metrics.items():
            if key in ("alias", "name", "sample_len") or "stderr" in key:
                continue
            metric = key.split(",")[0]
            clean[metric] = value
        results[task] = clean
    samples = {task: int(n["effective"]) if isinstance(n, dict) else int(n)
               for task, n in out.get("n-samples", {}).items()}
    return {"bundle": str(Path(bundle).resolve()), "tasks": list(tasks), "limit": limit, "results": results,
            "samples": samples, "metadata": metadata,
            "command": command_line(args, tasks, paths, metadata),
            "lm_eval_version": _version("lm_eval")}


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def format_table(report: Dict[str, Any]) -> str:
    rows = ["| task | samples | metric | value |", "|---|---:|---|---:|"]
    for task, metrics in sorted(report["results"].items()):
        for metric, value in metrics.items():
            if isinstance(value, (int, float)):
                rows.append(f"| {task} | {report['samples'].get(task, '')} | {metric} | {value:.4f} |")
    return "\n".join(rows)


def _run(args) -> int:
    tasks = [t for item in args.tasks for t in item.split(",") if t]
    try:
        metadata = json.loads(args.metadata) if args.metadata else {}
        if not isinstance(metadata, dict):
            raise ValueError("expected a JSON object")
    except ValueError as exc:
        print(f"mmtrain eval-harness: --metadata {args.metadata!r}: {exc}", file=sys.stderr)
        return 2
    try:
        if args.print_command:
            margs = model_args(args.bundle, args.device, args.batch_size)
            print(command_line(margs, tasks, [str(TASKS_DIR), *args.include_path], metadata))
            return 0
        report = evaluate(args.bundle, tasks, limit=args.limit, batch_size=args.batch_size, device=args.device,
                          include_paths=args.include_path, seed=args.seed, metadata=metadata)
    except (HarnessError, FileNotFoundError, ValueError) as exc:   # ValueError: BundleError, DataError too
        print(f"mmtrain eval-harness: {exc}", file=sys.stderr)
        return 2
    print(f"bundle {report['bundle']}\nlm-evaluation-harness {report['lm_eval_version']}: {report['command']}\n")
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval-harness", help="lm-evaluation-harness on a bundle (offline; mmtrain's local tasks or any other)",
        description="Run EleutherAI's lm-evaluation-harness on an exported language-model bundle through its "
                    "Hugging Face model, scored as mmtrain trains (documents after EOS, windows of n_ctx). "
                    f"Needs the harness extra: {INSTALL_HINT}.")
    p.add_argument("bundle", help="directory written by `mmtrain export`")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), metavar="TASK",
                   help="task names, space or comma separated (default: mmtrain_docstrings = "
                        "mmtrain_docstrings_ppl + mmtrain_docstrings_summary)")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="more task YAML files (repeatable)")
    p.add_argument("--limit", type=float, default=None,
                   help="only the first N documents per task (or a fraction if < 1)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=0, help="the harness's random seeds (default 0)")
    p.add_argument("--metadata", metavar="JSON", default="",
                   help='task metadata, as the harness\'s --metadata, e.g. \'{"body_chars": 60}\' (the summary '
                        f'task\'s body excerpt, default {BODY_CHARS} characters)')
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--print-command", action="store_true",
                   help="print the equivalent `lm_eval` command line and exit")
    p.set_defaults(func=_run)


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="mmtrain")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval-harness", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
