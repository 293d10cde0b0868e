"""The data sections: pretraining shards (``data``), `mmtrain prepare`, `mmtrain prepare-pairs` and the
pair shards of retrieval training: schemas and checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from omegaconf import DictConfig

from mmtrain.config import register_validator, seed_setting, setting


DEFAULT_SHARD_DIR = "data/demo"


def download_retry_setting():
    """``download_retry`` of a data section that may read a store URL."""
    return setting(3, "Retries of an object-store download (exponential backoff: 1, 2, 4 ... s, at most 30 s) "
                      "before the run stops with an error naming the object.", ge=0, role="watch")


def download_timeout_setting():
    """``download_timeout`` of a data section that may read a store URL."""
    return setting(60.0, "Seconds one object-store download may take.", gt=0, role="watch")


@dataclass
class StreamSpec:
    name: str = setting("", "Name of the stream in metrics and TensorBoard (eval/<name>/loss_ctx<N>); '' = "
                        "stream<i>.")
    shard_dir: str = setting("", "Its shards: a directory or a URL (s3://, gs://, oci://, hf://, azure://, "
                                 "file:///...) written by `mmtrain prepare`.")
    cache_dir: str = setting("", "Local cache when shard_dir is a URL; '' = a directory of its own under "
                                 "~/.cache/mmtrain/shards ($MMTRAIN_CACHE).")
    proportion: float = setting(0.0, "Share of every epoch's samples drawn from this stream (weights are "
                                     "normalised over the streams); 0 = not set. Give it for all streams or none.", ge=0)
    repeat: float = setting(0.0, "Instead of proportion: take this stream's samples this many times per epoch "
                                 "(0.5 = half of them, 2 = each twice); 0 = not set.", ge=0)
    choose: int = setting(0, "Instead of proportion: take this many of this stream's samples per epoch; 0 = not set.",
                          ge=0)


@dataclass
class DataConfig:
    shard_dir: str = setting(DEFAULT_SHARD_DIR, "Directory or URL written by `mmtrain prepare`; training reads "
                                     "<shard_dir>/ctx<n_ctx>/{train,val} and its meta.json. A URL (s3://bucket/prefix, "
                                     "gs://, oci://, hf://, azure://, file:///nfs/path) is streamed into a local "
                                     "cache (docs/data.md).", role="layout")
    streams: List[StreamSpec] = setting(list, "A mixture instead of shard_dir: datasets (directories or URLs) "
                                        "with a proportion, repeat or choose each, mapped onto streaming's "
                                        "Streams; all must share tokenizer and n_ctx. Example: "
                                        "[{name: web, shard_dir: s3://b/web, proportion: 0.8}, "
                                        "{name: code, shard_dir: data/code, proportion: 0.2}].", factory=True)
    cache_dir: str = setting("", "Local cache of a shard_dir URL (per node); '' = a directory of its own under "
                                 "~/.cache/mmtrain/shards ($MMTRAIN_CACHE). Reused across runs: shards "
                                 "already there and verified are not downloaded again.", role="watch")
    cache_limit: str = setting("", "Most bytes the cache of a URL may hold, e.g. `20gb`; the shards used least "
                                   "recently are evicted (streaming's cache_limit); '' = no limit.", role="watch")
    predownload: int = setting(0, "Samples each data-loader worker downloads ahead of use; 0 = streaming's "
                                  "default (8 x micro_batch_size).", ge=0, role="watch")
    download_retry: int = download_retry_setting()
    download_timeout: float = download_timeout_setting()
    tokenizer: str = setting("", "SentencePiece .model the shards were made with; '' = the one recorded in "
                            "the shards' meta.json. A hash mismatch with the shards is an error.")
    auto_prepare: bool = setting(True, "If the shards are missing and `prepare_input` is `demo`, prepare them "
                                  "on first use (cached afterwards).", role="watch")
    prepare_input: str = setting("demo", "Corpus used by auto_prepare: `demo` (built-in Python-docstring corpus).", role="watch")
    num_workers: int = setting(2, "Data-loader worker processes per rank (e.g. 2).", ge=0, role="watch")
    shuffle: bool = setting(True, "Shuffle training samples (seeded by train.seed).")
    num_canonical_nodes: int = setting(0, "streaming's canonical node count, which fixes the sample order; "
                                     "0 = the number of physical nodes (the order then changes with the "
                                     "node count). Set it (e.g. to the largest node count you will use) "
                                     "to keep one data order when a job is resumed on a different number of nodes.", ge=0)
    verify_shards: bool = setting(True, "Check every shard file's sha1 against its index.json before training "
                                        "(a corrupt shard is named before any step; about 1 s per GB read).", role="watch")


@dataclass
class TokenizerSpec:
    type: str = setting("bpe", "SentencePiece model type.", choices=["bpe", "unigram"])
    vocab_size: int = setting(4096, "Vocabulary size including the 4 special ids.", ge=8)
    character_coverage: float = setting(1.0, "SentencePiece character_coverage.", gt=0, le=1)
    max_sentence_length: int = setting(16384, "Longest training sentence in bytes (longer ones are skipped).", ge=1)
    seed: int = seed_setting(0, "Seed of SentencePiece's random generator (matters for unigram); training reads "
                      "the first 50 M characters in corpus order, no sampling.")


@dataclass
class PrepareConfig:
    input: List[str] = setting(lambda: ["demo"], "Corpus paths, directories or globs (.txt, .jsonl, .jsonl.gz, "
                                           ".parquet); `demo` = the built-in docstring corpus.", factory=True)
    text_field: str = setting("text", "JSONL key / Parquet column holding the document text.")
    delimiter: str = setting("", "Plain text: string separating documents inside a file; '' = one document per file.")
    out: str = setting("data/demo", "Output root; one <out>/ctx<n_ctx>/ directory per context length. A store URL "
                                    "(s3://bucket/prefix, gs://..., file:///path) is written into a local staging "
                                    "directory, then uploaded, each meta.json last.")
    n_ctx: List[int] = setting(lambda: [128, 512], "Context lengths to write shards for.", factory=True, ge=2)
    tokenizer: str = setting("", "Existing SentencePiece .model to use; '' = train one into <out>/tokenizer.model.")
    tokenizer_spec: TokenizerSpec = field(default_factory=TokenizerSpec)
    packing: str = setting("concat", "`concat`: documents joined with EOS and cut into blocks; `pad`: each "
                                "document truncated / right-padded to one block.", choices=["concat", "pad"])
    val_fraction: float = setting(0.05, "Fraction of documents held out for validation (by document).", gt=0, lt=1)
    seed: int = seed_setting(0, "Seed of the train/validation split.")
    num_proc: int = setting(2, "Tokenizer worker processes.", ge=1)
    max_docs: int = setting(0, "Use only the first N documents; 0 = all.", ge=0)
    overwrite: bool = setting(False, "Replace an existing ctx<N> directory prepared with another recipe (corpus, "
                                     "packing, split, held-out pairs), and write into a non-empty `out` that "
                                     "holds no shards; without it both are errors. A ctx<N> directory holding "
                                     "anything but shards is never replaced.")
    exclude_pairs: List[str] = setting(list, "Pair directories (`mmtrain prepare-pairs`) whose held-out val and test "
                                        "pairs must not leak into pretraining: documents containing the text "
                                        "of any held-out query or document are dropped.", factory=True)
    part: str = setting("", "Prepare only part I of N of the corpus (`I/N`, 0-based, e.g. 0/8): the documents "
                           "whose text hashes to I, into <out>/ctx<n>/<split>/part-IIIII-of-NNNNN; needs "
                           "`tokenizer` or <out>/tokenizer.model. '' = the whole corpus.")
    merge: bool = setting(False, "Join the complete parts in `out` into one dataset per n_ctx (index.json per "
                                 "split, meta.json last); reads no corpus.")


@dataclass
class PairsConfig:
    input: List[str] = setting(lambda: ["demo"], "JSONL files (.jsonl / .jsonl.gz) of (query, document) pairs; "
                                           "`demo` = the built-in Python docstring pairs (summary line -> "
                                           "rest of the docstring).", factory=True)
    query_field: str = setting("query", "JSONL key of the query text (e.g. summary).")
    document_field: str = setting("document", "JSONL key of the document text (e.g. story).")
    bundle: str = setting("", "Exported bundle whose tokenizer is used (and whose n_ctx bounds n_ctx).")
    tokenizer: str = setting("", "A SentencePiece .model to use instead of a bundle's.")
    out: str = setting("data/pairs/demo", "Output directory: meta.json, tokenizer.model, train/ and test/ MDS shards; "
                                          "or a store URL (s3://bucket/prefix, file:///path, ...): written into a "
                                          "local staging directory, then uploaded, meta.json last.")
    overwrite: bool = setting(False, "Replace a non-empty `out` that holds no pair shards (a directory holding "
                                     "anything else is never replaced). Pair shards of another recipe are "
                                     "replaced without it.")
    n_ctx: int = setting(0, "Tokens per query / document (truncated, right-padded); 0 = the bundle's n_ctx.", ge=0)
    append_eos: bool = setting(True, "End every query and document with EOS (kept when truncating), so "
                                "last-token pooling reads the same token everywhere.")
    test_fraction: float = setting(0.1, "Fraction of (distinct) documents held out as the test split.", gt=0, lt=1)
    val_fraction: float = setting(0.1, "Fraction of documents held out as the validation split (carved from "
                                  "what would be training pairs; the test split does not depend on it). "
                                  "Retrieval training evaluates on it; 0 = no val split.", ge=0, lt=1)
    seed: int = seed_setting(0, "Seed of the train/val/test split (a hash of seed and document text).")
    max_pairs: int = setting(0, "Use only the first N pairs read (before deduplication); 0 = all.", ge=0)
    from_documents: str = setting("", "Build pairs from unlabeled documents instead of reading labeled pairs: "
                                 "`crop` = two independent random token spans of a document (Contriever), "
                                 "`ict` = one sentence -> the rest of its passage (inverse cloze task). "
                                 "`input` is then a corpus as for `mmtrain prepare`.",
                             choices=["", "crop", "ict"])
    text_field: str = setting("text", "from_documents: JSONL key / Parquet column of the document text.")
    delimiter: str = setting("", "from_documents: plain-text separator between documents ('' = one per file).")
    max_documents: int = setting(0, "from_documents: use only the first N documents; 0 = all.", ge=0)
    pairs_per_document: int = setting(1, "from_documents: pairs drawn from each document (each an independent "
                                    "crop / sentence).", ge=1)
    crop_min_ratio: float = setting(0.1, "crop: shortest span as a fraction of the document's tokens.", gt=0, le=1)
    crop_max_ratio: float = setting(0.5, "crop: longest span as a fraction of the document's tokens.", gt=0, le=1)
    min_span_tokens: int = setting(4, "crop / ict: shortest span (query or document) in tokens.", ge=1)
    min_document_tokens: int = setting(16, "from_documents: skip documents shorter than this many tokens.", ge=2)
    ict_keep_fraction: float = setting(0.1, "ict: probability that the query sentence is left in its passage.", ge=0, le=1)
    exclude_pairs: List[str] = setting(list, "Pair directories whose held-out (val and test) pairs must not leak "
                                        "in: input documents containing the text of any of their held-out "
                                        "queries or documents are dropped.", factory=True)
    hard_negatives: int = setting(0, "BM25-mined negatives stored per training query (top-ranked training "
                                "documents other than the query's own, via bm25s); 0 = none.", ge=0)


@dataclass
class PairDataConfig:
    shard_dir: str = setting("data/pairs/demo", "Directory or URL (s3://bucket/prefix, file:///...) written by "
                                                "`mmtrain prepare-pairs`; a URL is copied whole into a local cache "
                                                "(every shard's sha1 checked) before training.", role="layout")
    cache_dir: str = setting("", "Local copy of a shard_dir URL; '' = a directory of its own under "
                                 "~/.cache/mmtrain/pairs ($MMTRAIN_CACHE).", role="watch")
    download_retry: int = download_retry_setting()
    download_timeout: float = download_timeout_setting()
    num_workers: int = setting(0, "Data-loader worker processes per rank.", ge=0, role="watch")
    shuffle: bool = setting(True, "Shuffle training pairs (seeded by train.seed).")


def validate_prepare(cfg: DictConfig) -> List[str]:
    """What a prepare config cannot run with besides out-of-range values (load_config checks those)."""
    p: List[str] = []
    if not cfg.input:
        p.append("input: give at least one corpus path (or `demo`)")
    if not cfg.n_ctx:
        p.append("n_ctx: give at least one context length")
    if cfg.part:
        from mmtrain.data.parts import parse_part

        try:
            parse_part(cfg.part)
        except ValueError as exc:
            p.append(f"part: {exc}")
        if cfg.merge:
            p.append("part / merge: give one of them (run every --part I/N first, then one --merge)")
    p += _url_problems(cfg.out)
    return p


def _url_problems(out: str) -> List[str]:
    from mmtrain.data.errors import DataError
    from mmtrain.data.remote import check_url, is_remote

    if not is_remote(out):
        return []
    try:
        check_url(out)
    except DataError as exc:
        return [f"out: {exc}"]
    return []


def validate_pairs(cfg: DictConfig) -> List[str]:
    """What a prepare-pairs config cannot run with besides out-of-range values (load_config checks those)."""
    p: List[str] = []
    if not cfg.input:
        p.append("input: give at least one JSONL file (or `demo`)")
    if not cfg.bundle and not cfg.tokenizer:
        p.append("bundle: give an exported bundle (or tokenizer: a .model file) to tokenize with")
    if cfg.n_ctx == 1:
        p.append(f"n_ctx: must be 0 (the bundle's) or >= 2, got {cfg.n_ctx}")
    if cfg.n_ctx == 0 and not cfg.bundle:
        p.append("n_ctx: 0 means the bundle's n_ctx, but no bundle is given")
    if cfg.test_fraction + cfg.val_fraction >= 1.0:
        p.append(f"test_fraction + val_fraction: must be < 1, got {cfg.test_fraction} + {cfg.val_fraction}")
    if cfg.crop_min_ratio > cfg.crop_max_ratio:
        p.append(f"crop_min_ratio / crop_max_ratio: need min <= max, got {cfg.crop_min_ratio} / "
                 f"{cfg.crop_max_ratio}")
    if not cfg.query_field or not cfg.document_field:
        p.append("query_field / document_field: must not be empty")
    p += _url_problems(cfg.out)
    return p


def validate_data(data: DictConfig, prefix: str = "data") -> List[str]:
    """What a data section cannot run with besides out-of-range values."""
    p: List[str] = []
    if data.streams and data.shard_dir != DEFAULT_SHARD_DIR:
        p.append(f"{prefix}.shard_dir / {prefix}.streams: give one of them (with streams, every stream names "
                 "its own shard_dir)")
    if data.streams and data.cache_dir:
        p.append(f"{prefix}.cache_dir: with streams, give each stream its own cache_dir")
    if data.cache_limit:
        from mmtrain.data.remote import parse_bytes

        try:
            parse_bytes(data.cache_limit)
        except ValueError as exc:
            p.append(f"{prefix}.cache_limit: {exc}")
    names = []
    weighted = [bool(s.proportion) for s in data.streams]
    for i, s in enumerate(data.streams):
        key = f"{prefix}.streams[{i}]"
        if not s.shard_dir:
            p.append(f"{key}.shard_dir: required (a directory or URL written by `mmtrain prepare`)")
        set_ = [k for k in ("proportion", "repeat", "choose") if s[k]]
        if len(set_) > 1:
            p.append(f"{key}: give one of proportion, repeat, choose (got {', '.join(set_)})")
        names.append(s.name or f"stream{i}")
        if not (s.name or f"stream{i}").replace("_", "").replace("-", "").isalnum():
            p.append(f"{key}.name: letters, digits, '-' and '_' only, got {s.name!r}")
    if any(weighted) and not all(weighted):
        p.append(f"{prefix}.streams: give a proportion for every stream or for none (streaming's rule); "
                 f"set for {sum(weighted)} of {len(weighted)}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        p.append(f"{prefix}.streams: names must be unique, repeated: {', '.join(dupes)}")
    return p


register_validator(PrepareConfig, validate_prepare)
register_validator(PairsConfig, validate_pairs)
