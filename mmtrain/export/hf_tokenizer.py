"""A Hugging Face tokenizer for mmtrain's SentencePiece models (copied into every bundle as
``tokenization_mmtrain.py``; it imports only sentencepiece and transformers, never mmtrain).

``AutoTokenizer.from_pretrained(bundle, trust_remote_code=True)`` loads it through the
``auto_map`` of the bundle's tokenizer_config.json. Text is encoded exactly as mmtrain encodes it:
``SentencePieceProcessor.encode(text)`` on the whole text (identity normalisation, no BOS, special
token strings in the text are ordinary text), plus the document markers the bundle was made for:

* ``add_doc_start`` (language-model bundles): EOS in front, the document separator that precedes
  every document in mmtrain's packed training data, as ``mmtrain generate`` puts it before a prompt;
* ``add_eos_token`` (embedders trained with ``append_eos``): EOS after the text, as
  ``mmtrain prepare-pairs`` / ``eval-retrieval`` tokenize queries and documents.

Truncation to ``max_length`` keeps room for these markers, so with ``max_length = n_ctx`` a long
text becomes its first ``n_ctx - 1`` tokens followed by EOS, as in mmtrain. An empty text with no
marker becomes ``[EOS]``. Padding is on the right with the pad id 0 (the models are causal, so
right padding never changes the outputs at real tokens). ``decode`` is SentencePiece's.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

import sentencepiece as spm
from transformers import PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}


class MmtrainTokenizer(PreTrainedTokenizer):
    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"

    def __init__(self, vocab_file: str, add_eos_token: bool = False, add_doc_start: bool = False,
                 unk_token: str = "<unk>", bos_token: str = "<s>", eos_token: str = "</s>", pad_token: str = "<pad>",
                 **kwargs: Any):
        self.vocab_file = vocab_file
        self.add_eos_token = bool(add_eos_token)
        self.add_doc_start = bool(add_doc_start)
        self.sp_model = spm.SentencePieceProcessor(model_file=vocab_file)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("padding_side", "right")
        super().__init__(unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                         add_eos_token=self.add_eos_token, add_doc_start=self.add_doc_start, **kwargs)

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["sp_model"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.sp_model = spm.SentencePieceProcessor(model_file=self.vocab_file)

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> Dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def tokenize(self, text: str, **kwargs: Any) -> List[str]:
        """The SentencePiece pieces of the whole text (special token strings are not split out)."""
        return self.sp_model.encode(text, out_type=str)

    def _tokenize(self, text: str, **kwargs: Any) -> List[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(int(index))

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        return self.sp_model.decode_pieces(list(tokens))

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: Optional[bool] = None,
                **kwargs: Any) -> str:
        ids = [int(i) for i in ([token_ids] if isinstance(token_ids, int) else token_ids)]
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        return self.sp_model.decode(ids)

    def _markers(self) -> Tuple[List[int], List[int]]:
        return ([self.eos_token_id] if self.add_doc_start else []), ([self.eos_token_id] if self.add_eos_token else [])

    def build_inputs_with_special_tokens(self, token_ids_0: List[int],
                                         token_ids_1: Optional[List[int]] = None) -> List[int]:
        before, after = self._markers()
        ids = before + list(token_ids_0) + after
        if token_ids_1 is not None:
            ids += before + list(token_ids_1) + after
        return ids or [self.eos_token_id]

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        before, after = self._markers()
        return (len(before) + len(after)) * (2 if pair else 1)

    def get_special_tokens_mask(self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None,
                                already_has_special_tokens: bool = False) -> List[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        before, after = self._markers()
        mask = [1] * len(before) + [0] * len(token_ids_0) + [1] * len(after)
        if token_ids_1 is not None:
            mask += [1] * len(before) + [0] * len(token_ids_1) + [1] * len(after)
        return mask or [1]

    def create_token_type_ids_from_sequences(self, token_ids_0: List[int],
                                             token_ids_1: Optional[List[int]] = None) -> List[int]:
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> Tuple[str]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"vocabulary path {save_directory} should be a directory")
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        out = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            if os.path.isfile(self.vocab_file):
                shutil.copyfile(self.vocab_file, out)
            else:
                with open(out, "wb") as fh:
                    fh.write(self.sp_model.serialized_model_proto())
        return (out,)
