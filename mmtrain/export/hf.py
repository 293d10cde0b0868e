"""Hugging Face interop: the files that make a bundle load with ``transformers`` (and an embedder
with ``sentence-transformers``), and the one place mmtrain imports ``transformers``.

Writing those files needs neither library (they are JSON and two Python files copied from this
package); only :func:`import_transformers` imports transformers, when called.

Files added to every bundle (:func:`write_hf_files`, called whenever config.json is written):

* ``tokenization_mmtrain.py`` (:mod:`mmtrain.export.hf_tokenizer`) + ``tokenizer_config.json`` +
  ``special_tokens_map.json``: ``AutoTokenizer.from_pretrained(bundle, trust_remote_code=True)``,
  mmtrain's SentencePiece encoding with the document markers of the bundle (EOS before a prompt for
  language models, EOS after the text for embedders trained with ``append_eos``);
* ``generation_config.json`` (generative kinds): EOS / pad ids and ``max_length = n_ctx``;
* for the mixer, the hybrid and the mixer autoencoder, ``modeling_mmtrain.py``
  (:mod:`mmtrain.export.hf_modeling`, only torch + transformers) and config.json's ``auto_map``,
  ``architectures``, ``model_type`` and the usual size keys (:func:`hf_config_keys`):
  ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` ``.from_pretrained(bundle,
  trust_remote_code=True)``. The transformer stays a plain ``LlamaForCausalLM`` (config.json holds
  ``LlamaConfig`` keys); the bidirectional mixer is not a causal LM and gets no model classes.

:func:`write_sentence_transformers` adds what ``SentenceTransformer(path, trust_remote_code=True)``
reads (``mmtrain export-embedder --format sentence-transformers``).

transformers comes in through mosaicml-streaming. Its model classes import torchvision when the
package is installed, and the PyPI torchvision wheel that pip pairs with the CPU build of torch
does not load (``RuntimeError: operator torchvision::nms does not exist``), so even
``from transformers import LlamaForCausalLM`` fails. The text models never need torchvision:
when it cannot be imported, transformers is told it is absent before any model class loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Union

MODELING_FILE = "modeling_mmtrain.py"
TOKENIZATION_FILE = "tokenization_mmtrain.py"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"

#: Kinds that load through modeling_mmtrain.py (trust_remote_code); the transformer is Llama.
REMOTE_CODE_KINDS = ("mixer", "hybrid", "mixer_autoencoder")
GENERATIVE_KINDS = ("mixer", "transformer", "hybrid")
#: Kinds whose embeddings sentence-transformers reproduces: causal models, whose hidden states at
#: real tokens do not depend on right padding (the autoencoder's embedding reads the last
#: position, padding included; the bidirectional mixer reads right padding).
EMBEDDER_KINDS = ("mixer", "transformer", "hybrid")
AUTO_MAP = {"AutoConfig": "modeling_mmtrain.MmtrainConfig",
            "AutoModel": "modeling_mmtrain.MmtrainModel",
            "AutoModelForCausalLM": "modeling_mmtrain.MmtrainForCausalLM"}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_mmtrain.MmtrainTokenizer", None]}
_HERE = Path(__file__).resolve().parent
_SOURCES = {MODELING_FILE: _HERE / "hf_modeling.py", TOKENIZATION_FILE: _HERE / "hf_tokenizer.py"}

ST_MODULES_FILE = "modules.json"
ST_CONFIG_FILE = "config_sentence_transformers.json"
ST_TRANSFORMER_CONFIG_FILE = "sentence_bert_config.json"

PathLike = Union[str, Path]


def import_transformers() -> ModuleType:
    """``import transformers`` with a broken torchvision hidden from it; returns the module.

    ImportError (from Python) when transformers itself is not installed.
    """
    try:
        import torchvision  # noqa: F401
    except Exception:  # a torchvision wheel built for another torch; text models never need it
        import transformers.utils.import_utils as import_utils

        import_utils._torchvision_available = False
    import transformers

    return transformers


def llama_classes():
    """``(LlamaConfig, LlamaForCausalLM)`` from transformers."""
    transformers = import_transformers()
    return transformers.LlamaConfig, transformers.LlamaForCausalLM


# --------------------------------------------------------------------------------------------
# Files of every bundle
# --------------------------------------------------------------------------------------------


def hf_config_keys(model_cfg: Dict[str, Any], tokenizer, dtype_name: str) -> Dict[str, Any]:
    """Top-level config.json keys of a remote-code kind (empty for the others)."""
    if model_cfg["kind"] not in REMOTE_CODE_KINDS:
        return {}
    return {"architectures": ["MmtrainForCausalLM"], "model_type": "mmtrain", "auto_map": dict(AUTO_MAP),
            "vocab_size": model_cfg["vocab_size"], "hidden_size": model_cfg["d_model"],
            "num_hidden_layers": model_cfg["n_layers"], "max_position_embeddings": model_cfg["n_ctx"],
            "tie_word_embeddings": bool(model_cfg["tie_embeddings"]), "torch_dtype": dtype_name,
            "pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}


def tokenizer_settings(section: Dict[str, Any]) -> Dict[str, bool]:
    """The document markers of a bundle's tokenizer: an embedder's EOS after the text (its
    ``append_eos``), else a generative LM's EOS before the prompt (``mmtrain generate``'s)."""
    embedder = section.get("embedder")
    if embedder is not None:
        return {"add_doc_start": False, "add_eos_token": bool(embedder.get("append_eos", True))}
    return {"add_doc_start": section["model"]["kind"] in GENERATIVE_KINDS, "add_eos_token": False}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_hf_files(directory: PathLike, config: Dict[str, Any]) -> List[str]:
    """Write the Hugging Face files of the bundle whose config.json dict is ``config`` into
    ``directory`` (which holds its tokenizer.model); returns their names."""
    from mmtrain.data.tokenizer import load_tokenizer

    directory = Path(directory)
    section = config["mmtrain"]
    model = section["model"]
    tokenizer = load_tokenizer(directory / section["tokenizer"]["file"])
    piece = tokenizer.sp.id_to_piece
    special = {"bos_token": piece(tokenizer.bos_id), "eos_token": piece(tokenizer.eos_id),
               "unk_token": piece(tokenizer.unk_id), "pad_token": piece(tokenizer.pad_id)}
    written = [TOKENIZATION_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE]
    shutil.copyfile(_SOURCES[TOKENIZATION_FILE], directory / TOKENIZATION_FILE)
    _write_json(directory / TOKENIZER_CONFIG_FILE, {
        "tokenizer_class": "MmtrainTokenizer", "auto_map": TOKENIZER_AUTO_MAP, **tokenizer_settings(section),
        "model_max_length": model["n_ctx"], "padding_side": "right", "clean_up_tokenization_spaces": False,
        **special})
    _write_json(directory / SPECIAL_TOKENS_FILE, special)
    if model["kind"] in GENERATIVE_KINDS:
        _write_json(directory / GENERATION_CONFIG_FILE, {
            "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
            "max_length": model["n_ctx"]})
        written.append(GENERATION_CONFIG_FILE)
    if model["kind"] in REMOTE_CODE_KINDS:
        shutil.copyfile(_SOURCES[MODELING_FILE], directory / MODELING_FILE)
        written.append(MODELING_FILE)
    return written


# --------------------------------------------------------------------------------------------
# sentence-transformers
# --------------------------------------------------------------------------------------------

_ST_POOLING = {"mean": "pooling_mode_mean_tokens", "last": "pooling_mode_lasttoken"}


def write_sentence_transformers(directory: PathLike, config: Dict[str, Any]) -> List[str]:
    """Make the embedder bundle in ``directory`` a sentence-transformers model folder as well:
    Transformer (the bundle's AutoModel and tokenizer, max_seq_length = n_ctx) -> pooling as the
    embedder was trained (``Pooling`` for mean / last, the bundle's ``MmtrainPooling`` for
    second_to_last) -> ``Normalize``. ValueError for a bundle that is not an embedder of a causal
    kind. Returns the files and directories written."""
    directory = Path(directory)
    section = config["mmtrain"]
    model, embedder = section["model"], section.get("embedder")
    if embedder is None:
        raise ValueError("not an embedder bundle (config.json has no mmtrain.embedder section): export a "
                         "retrieval run with `mmtrain export-embedder`")
    if model["kind"] not in EMBEDDER_KINDS:
        raise ValueError(f"model kind {model['kind']!r} cannot be a sentence-transformers embedder: its "
                         "embeddings depend on the padding of the batch (sentence-transformers kinds: "
                         f"{', '.join(EMBEDDER_KINDS)})")
    pooling, d = embedder["pooling"], model["d_model"]
    if pooling in _ST_POOLING:
        pool_dir, pool_type = "1_Pooling", "sentence_transformers.models.Pooling"
        pool_config = {"word_embedding_dimension": d, "pooling_mode_cls_token": False,
                       "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
                       "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
                       "pooling_mode_lasttoken": False, "include_prompt": True, _ST_POOLING[pooling]: True}
    else:
        if model["kind"] not in REMOTE_CODE_KINDS:   # the pooling module lives in modeling_mmtrain.py
            shutil.copyfile(_SOURCES[MODELING_FILE], directory / MODELING_FILE)
        pool_dir, pool_type = "1_MmtrainPooling", "modeling_mmtrain.MmtrainPooling"
        pool_config = {"pooling": pooling, "embedding_dimension": d}
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": pool_dir, "type": pool_type},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    _write_json(directory / ST_MODULES_FILE, modules)
    _write_json(directory / ST_TRANSFORMER_CONFIG_FILE, {"max_seq_length": model["n_ctx"], "do_lower_case": False})
    _write_json(directory / ST_CONFIG_FILE, {"model_type": "SentenceTransformer", "prompts": {},
                                             "default_prompt_name": None, "similarity_fn_name": "cosine"})
    (directory / pool_dir).mkdir(exist_ok=True)
    _write_json(directory / pool_dir / "config.json", pool_config)
    (directory / "2_Normalize").mkdir(exist_ok=True)
    return [ST_MODULES_FILE, ST_TRANSFORMER_CONFIG_FILE, ST_CONFIG_FILE, pool_dir, "2_Normalize"]
