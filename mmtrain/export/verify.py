"""`mmtrain verify BUNDLE`: check a bundle without building its model, for loaders that are not
mmtrain's (``transformers`` for a transformer bundle, copies made by other tools) and before
shipping one.

Checks, every problem listed (exit 2), else exit 0:

* config.json against the bundle schema (model kind, key types and ranges, tokenizer, digests);
* the tensors config.json's model stores against the safetensors headers (names, shapes, dtype);
* every weight file's size and sha256 against config.json's digests (a bundle written before
  mmtrain recorded digests cannot be verified: exit 2, re-export it);
* the tokenizer against the sha256 config.json records.

It also says whether the bundle's ``modeling_mmtrain.py`` / ``tokenization_mmtrain.py`` (code that
``trust_remote_code=True`` runs) are this mmtrain's own copies; another version's differ, so that
is information, not a problem.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Tuple

from mmtrain.export import bundle as B


def _code_file_notes(path: Path) -> List[str]:
    """Whether the bundle's remote-code files equal the ones this mmtrain writes."""
    from mmtrain.export.hf import _SOURCES

    notes = []
    for name, source in _SOURCES.items():
        copy = path / name
        if not copy.is_file():
            continue
        if B.file_digest(copy)["sha256"] == B.file_digest(source)["sha256"]:
            notes.append(f"{name}: this mmtrain's own copy")
        else:
            notes.append(f"{name}: differs from this mmtrain's copy (another version, or edited): read it "
                         "before loading with trust_remote_code=True")
    return notes


def check_bundle(path: Path) -> Tuple[List[str], List[str]]:
    """``(report lines, problems)`` of the bundle at ``path``; no problems = verified."""
    lines: List[str] = []
    try:
        section = B.read_bundle_config(path)
    except B.BundleError as exc:
        return lines, [str(exc)]
    model = section["model"]
    lines.append(f"{B.CONFIG_NAME}: valid ({model['kind']}, d_model {model['d_model']}, {model['n_layers']} layers, "
                 f"n_ctx {model['n_ctx']}, vocab {model['vocab_size']}, {section.get('dtype', 'float32')})")
    problems: List[str] = []
    digests = section.get(B.DIGESTS_KEY)
    try:
        files = B.weight_files(path)
    except B.BundleError as exc:
        return lines, [str(exc)]
    try:
        header = B.read_headers(path, files)
    except B.BundleError as exc:   # a truncated file is named as such rather than by what its header lacks
        sizes = B.digest_problems(path, section, files, sizes_only=True) if digests is not None else []
        return lines, sizes or [str(exc)]
    shape_problems = B.shape_problems(section, header)
    problems += [f"weights do not match {B.CONFIG_NAME}'s model: {p}" for p in shape_problems]
    if not shape_problems:
        lines.append(f"tensors: {len(header)} named and shaped as the model needs")
    if digests is None:
        problems.append(f"{path / B.CONFIG_NAME}: records no weight digests (a bundle written before mmtrain "
                        "recorded them), so its weights cannot be verified; re-export it with `mmtrain export`")
    else:
        bad = B.digest_problems(path, section, files)
        problems += bad
        for file in files:
            if not any(p.startswith(f"{B.bundle_file(path, file, 'weight file')}:") for p in bad):
                lines.append(f"{file}: {digests[file]['bytes']:,} bytes, sha256 {digests[file]['sha256']} ok")
        for file in sorted(set(digests) - set(files)):
            try:
                if not B.bundle_file(path, file, f"{B.DIGESTS_KEY} file").is_file():
                    problems.append(f"{path / file}: recorded in {B.CONFIG_NAME}'s digests but missing")
            except B.BundleError as exc:
                problems.append(str(exc))
    try:
        tokenizer = B.load_bundle_tokenizer(path)
        lines.append(f"{section['tokenizer']['file']}: sha256 {tokenizer.sha256[:12]}… (of its model proto) ok")
    except B.BundleError as exc:
        problems.append(str(exc))
    except (OSError, RuntimeError) as exc:   # sentencepiece's error for a damaged model file
        problems.append(f"{path / section['tokenizer']['file']}: not a readable SentencePiece model "
                        f"({type(exc).__name__}); re-export the bundle")
    lines += _code_file_notes(path)
    return lines, problems


def _run(args) -> int:
    path = Path(args.bundle)
    lines, problems = check_bundle(path)
    print(f"bundle {path.resolve()}")
    for line in lines:
        print(f"  {line}")
    if problems:
        listed = [p.replace("\n  - ", "\n      ") for p in problems]   # a problem's own list, indented
        print(f"mmtrain verify: {path}: {len(problems)} problem(s):\n  - " + "\n  - ".join(listed), file=sys.stderr)
        return 2
    print("verified: config.json, tensor shapes, weight digests and tokenizer all match")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verify", help="check a bundle: config schema, tensor shapes, weight sha256 digests, tokenizer",
        description="Check an exported bundle without building its model: config.json against the schema, "
                    "the safetensors headers against the model config.json describes, every weight file's size "
                    "and sha256 against config.json, and the tokenizer. Exit 0 when everything matches, 2 with "
                    "the list of problems otherwise.")
    p.add_argument("bundle", help="directory written by `mmtrain export` / `mmtrain export-embedder`")
    p.set_defaults(func=_run)
