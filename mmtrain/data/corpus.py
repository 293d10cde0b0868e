"""Corpus readers: text, JSON lines (optionally gzipped), JSON arrays, Parquet, and the demo corpus.

A corpus is a list of inputs (files, directories, globs, or ``demo``) read as one stream of
documents (``str``) in a fixed order: inputs in the order given, the files of a directory or glob
in sorted path order. Every reader streams (a file is never loaded whole, except a JSON array
file and a plain-text file that is itself one document), so corpora larger than memory work.

Documents are stripped of leading/trailing whitespace; empty documents are skipped.

=====================  ==================================================================
``*.txt``, ``*.md``,   plain text: the whole file is one document, or, with ``delimiter``
``*.txt.gz``           set (e.g. ``<|endoftext|>``), the pieces between delimiters
``*.jsonl``,           one JSON object per line; the document is ``obj[text_field]``
``*.ndjson``, ``*.gz``
``*.json``             JSON lines, or a JSON array of objects (loaded whole)
``*.parquet``          column ``text_field`` (read in record batches)
=====================  ==================================================================
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import IO, Iterator, List, Sequence

from mmtrain.data.demo_corpus import DEMO_INPUT, demo_description, demo_documents
from mmtrain.data.errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".txt.gz", ".md.gz")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".json.gz")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
_CHUNK_CHARS = 1 << 20
_GLOB_CHARS = set("*?[")


def file_format(path: str) -> str:
    """``text`` | ``jsonl`` | ``json`` | ``parquet`` from the file name; DataError if unsupported."""
    name = path.lower()
    for fmt, suffixes in (("jsonl", JSONL_SUFFIXES), ("json", JSON_SUFFIXES),
                          ("parquet", PARQUET_SUFFIXES), ("text", TEXT_SUFFIXES)):
        if name.endswith(suffixes):
            return fmt
    raise DataError(f"{path}: unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)}")


def _supported(path: str) -> bool:
    return path.lower().endswith(SUPPORTED_SUFFIXES)


def _files_under(directory: str) -> List[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, n) for n in sorted(filenames)
                     if not n.startswith(".") and _supported(n))
    return found


def resolve_inputs(inputs: Sequence[str]) -> List[str]:
    """Expand directories and globs into a list of files (``demo`` stays as is), in order.

    Raises DataError for a missing path, a glob or directory without supported files, and an
    explicitly named file of an unsupported type.
    """
    if not inputs:
        raise DataError("no corpus input given (pass file paths, directories, globs or `demo`)")
    files: List[str] = []
    for item in inputs:
        item = str(item)
        if item != DEMO_INPUT:
            item = os.path.expanduser(item)
        if item == DEMO_INPUT:
            files.append(DEMO_INPUT)
        elif _GLOB_CHARS & set(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise DataError(f"input glob matches nothing: {item}")
            expanded = []
            for m in matches:
                expanded.extend(_files_under(m) if os.path.isdir(m) else [m] if _supported(m) else [])
            if not expanded:
                raise DataError(f"input glob {item} matches {len(matches)} path(s) but no supported "
                                f"file ({', '.join(SUPPORTED_SUFFIXES)})")
            files.extend(expanded)
        elif os.path.isdir(item):
            found = _files_under(item)
            if not found:
                raise DataError(f"input directory has no supported files ({', '.join(SUPPORTED_SUFFIXES)}): {item}")
            files.extend(found)
        elif os.path.isfile(item):
            file_format(item)  # raises for an unsupported type
            files.append(item)
        else:
            raise DataError(f"input path not found: {item}")
    return files


def _open_text(path: str) -> IO[str]:
    if path.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, "r", encoding="utf-8", newline="")


def read_text(path: str, delimiter: str = "") -> Iterator[str]:
    """Plain text: the whole file (``delimiter == ''``) or the pieces between delimiters."""
    with _open_text(path) as fh:
        if not delimiter:
            yield fh.read()
            return
        pending = ""
        while True:
            chunk = fh.read(_CHUNK_CHARS)
            if not chunk:
                break
            pieces = (pending + chunk).split(delimiter)
            pending = pieces.pop()  # may continue in the next chunk
            yield from pieces
        yield pending


def _text_of(obj: object, text_field: str, where: str) -> str:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with field '{text_field}', got {type(obj).__name__}")
    if text_field not in obj:
        keys = ", ".join(map(str, list(obj)[:10])) or "none"
        raise DataError(f"{where}: no field '{text_field}' (this record has: {keys}); "
                        f"set text_field / --text-field to the key holding the document text")
    value = obj[text_field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{text_field}' is {type(value).__name__}, expected a string")
    return value


def read_jsonl(path: str, text_field: str = "text") -> Iterator[str]:
    """JSON lines: one object per line, document = ``obj[text_field]``. Errors name file:line."""
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            yield _text_of(obj, text_field, f"{path}:{lineno}")


def read_json(path: str, text_field: str = "text") -> Iterator[str]:
    """A ``.json`` file: a JSON array of objects (loaded whole), else read as JSON lines."""
    with open(path, "r", encoding="utf-8") as fh:
        head = fh.read(4096).lstrip()
    if not head.startswith("["):
        yield from read_jsonl(path, text_field)
        return
    with open(path, "r", encoding="utf-8") as fh:
        try:
            records = json.load(fh)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    for i, obj in enumerate(records):
        yield _text_of(obj, text_field, f"{path}: record {i}")


def read_parquet(path: str, text_field: str = "text", batch_rows: int = 1024) -> Iterator[str]:
    """Parquet: column ``text_field``, read one record batch at a time."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a damaged file
        raise DataError(f"{path}: cannot read as Parquet: {exc}") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column '{text_field}' (columns: {', '.join(names)}); "
                        f"set text_field / --text-field")
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            if not isinstance(value, str):
                raise DataError(f"{path}: row {row}: column '{text_field}' is "
                                f"{type(value).__name__}, expected a string")
            row += 1
            yield value


def read_file(path: str, text_field: str = "text", delimiter: str = "") -> Iterator[str]:
    """Raw documents of one file (not yet stripped / filtered)."""
    fmt = file_format(path)
    try:
        if fmt == "text":
            yield from read_text(path, delimiter)
        elif fmt == "jsonl":
            yield from read_jsonl(path, text_field)
        elif fmt == "json":
            yield from read_json(path, text_field)
        else:
            yield from read_parquet(path, text_field)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (OSError, EOFError) as exc:  # e.g. a truncated .gz
        raise DataError(f"{path}: cannot read: {exc}") from None


def contains_any(text: str, fragments: Sequence[str]) -> bool:
    """Whether ``text`` contains any of ``fragments`` (held-out texts kept out of a corpus)."""
    return any(f in text for f in fragments)


@dataclass
class Corpus:
    """A re-iterable stream of documents from ``inputs`` (resolved when created)."""

    inputs: List[str]
    text_field: str = "text"
    delimiter: str = ""
    max_docs: int = 0
    exclude: Sequence[str] = ()
    files: List[str] = field(init=False)
    excluded: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.inputs = [str(i) for i in self.inputs]
        self.files = resolve_inputs(self.inputs)

    def __iter__(self) -> Iterator[str]:
        """Documents in order, stripped; empty ones and those containing an ``exclude`` text skipped
        (``excluded`` counts the latter in the last pass)."""
        n = 0
        self.excluded = 0
        for path in self.files:
            raw = demo_documents() if path == DEMO_INPUT else read_file(path, self.text_field, self.delimiter)
            for text in raw:
                text = text.strip()
                if not text:
                    continue
                if self.exclude and contains_any(text, self.exclude):
                    self.excluded += 1
                    continue
                yield text
                n += 1
                if 0 < self.max_docs <= n:
                    return

    def fingerprint(self) -> str:
        """Identity of what the corpus reads: paths, sizes and mtimes (the demo: its description)."""
        h = hashlib.sha256()
        for path in self.files:
            if path == DEMO_INPUT:
                h.update(demo_description().encode())
            else:
                st = os.stat(path)
                h.update(f"{os.path.abspath(path)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def describe(self) -> str:
        """One line for meta.json: what was read."""
        parts = []
        for item in self.inputs:
            parts.append(demo_description() if item == DEMO_INPUT else item)
        files = [f for f in self.files if f != DEMO_INPUT]
        text = "; ".join(parts)
        if files:
            text += f" ({len(files)} file{'s' if len(files) != 1 else ''}"
            if any(file_format(f) in ("jsonl", "json", "parquet") for f in files):
                text += f", text field '{self.text_field}'"
            if self.delimiter and any(file_format(f) == "text" for f in files):
                text += f", delimiter {self.delimiter!r}"
            text += ")"
        if self.max_docs:
            text += f"; first {self.max_docs} documents"
        if self.exclude:
            text += f"; without documents containing any of {len(self.exclude)} held-out texts"
        return text
