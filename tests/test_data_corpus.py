"""Corpus readers: formats, order, streaming, the demo corpus, and clear errors."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmtrain.data import DataError
from mmtrain.data import corpus as corpus_mod
from mmtrain.data.corpus import Corpus, resolve_inputs
from mmtrain.data.demo_corpus import MIN_CHARS, demo_documents, demo_fingerprint


def write_jsonl(path, records, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_every_format_reads_in_the_given_order(tmp_path):
    (tmp_path / "a.txt").write_text("  whole file is one document\nwith two lines\n")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "jsonl one"}, {"text": "jsonl two", "id": 2}])
    write_jsonl(tmp_path / "c.jsonl.gz", [{"body": "gz one"}], gz=True)
    (tmp_path / "d.json").write_text(json.dumps([{"text": "array one"}, {"text": "array two"}]))
    pq.write_table(pa.table({"text": ["parquet one", "parquet two"], "n": [1, 2]}), tmp_path / "e.parquet")
    docs = list(Corpus([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), str(tmp_path / "d.json"),
                        str(tmp_path / "e.parquet")]))
    assert docs == ["whole file is one document\nwith two lines", "jsonl one", "jsonl two",
                    "array one", "array two", "parquet one", "parquet two"]
    assert list(Corpus([str(tmp_path / "c.jsonl.gz")], text_field="body")) == ["gz one"]


def test_directories_and_globs_expand_sorted_and_skip_unsupported_files(tmp_path):
    sub = tmp_path / "corpus"
    (sub / "z").mkdir(parents=True)
    (sub / "b.txt").write_text("B")
    (sub / "a.txt").write_text("A")
    (sub / "z" / "c.txt").write_text("C")
    (sub / "notes.csv").write_text("ignored")
    assert list(Corpus([str(sub)])) == ["A", "B", "C"]
    assert list(Corpus([str(sub / "*.txt")])) == ["A", "B"]
    assert list(Corpus([str(tmp_path / "**" / "c.txt")])) == ["C"]


def test_delimited_text_streams_in_chunks_and_splits_across_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "_CHUNK_CHARS", 7)  # force delimiters to straddle chunks
    stories = [f"Once upon a time {i}.\nThe end." for i in range(20)]
    (tmp_path / "stories.txt").write_text("<|endoftext|>".join(stories) + "<|endoftext|>\n")
    assert list(Corpus([str(tmp_path / "stories.txt")], delimiter="<|endoftext|>")) == stories


def test_empty_documents_are_skipped_and_max_docs_stops_early(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"text": "  "}, {"text": "one"}, {"text": ""}, {"text": "two"},
                                       {"text": "three"}])
    assert list(Corpus([str(tmp_path / "x.jsonl")])) == ["one", "two", "three"]
    assert list(Corpus([str(tmp_path / "x.jsonl")], max_docs=2)) == ["one", "two"]


def test_missing_input_path_is_an_error(tmp_path):
    with pytest.raises(DataError, match="input path not found: .*missing.jsonl"):
        Corpus([str(tmp_path / "missing.jsonl")])
    with pytest.raises(DataError, match="glob matches nothing"):
        resolve_inputs([str(tmp_path / "*.jsonl")])


def test_unsupported_file_type_is_an_error(tmp_path):
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="table.csv: unsupported file type"):
        Corpus([str(tmp_path / "table.csv")])


def test_jsonl_line_without_the_text_field_reports_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"text": "ok"}, {"story": "no text"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: no field 'text' \(this record has: story\)"):
        list(Corpus([str(path)]))


def test_invalid_json_and_non_string_text_report_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "unterminated\n')
    with pytest.raises(DataError, match=r"broken\.jsonl:3: not valid JSON"):
        list(Corpus([str(path)]))
    write_jsonl(tmp_path / "num.jsonl", [{"text": 5}])
    with pytest.raises(DataError, match=r"num\.jsonl:1: field 'text' is int"):
        list(Corpus([str(tmp_path / "num.jsonl")]))


def test_parquet_without_the_text_column_lists_the_columns(tmp_path):
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match="no column 'text' \\(columns: content\\)"):
        list(Corpus([str(tmp_path / "p.parquet")]))


def test_non_utf8_text_is_an_error(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt: not UTF-8"):
        list(Corpus([str(tmp_path / "latin1.txt")]))


def test_demo_corpus_is_english_docstrings_in_a_fixed_order():
    first = list(demo_documents(max_docs=50))
    assert first == list(demo_documents(max_docs=50))
    assert len(first) == 50 and all(len(d) >= MIN_CHARS for d in first)
    fp = demo_fingerprint()
    assert fp["documents"] > 5000 and fp["characters"] > 1_000_000
    docs = list(demo_documents())
    assert len(set(docs)) == len(docs)  # deduplicated
    assert docs[:50] == first
    assert list(Corpus(["demo"], max_docs=10)) == first[:10]
