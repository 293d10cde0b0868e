"""The one place mmtrain imports Hugging Face ``transformers`` (optional: only for interop checks).

transformers comes in through mosaicml-streaming. Its model classes import torchvision when the
package is installed, and the PyPI torchvision wheel that pip pairs with the CPU build of torch
does not load (``RuntimeError: operator torchvision::nms does not exist``), so even
``from transformers import LlamaForCausalLM`` fails. The text models never need torchvision:
when it cannot be imported, transformers is told it is absent before any model class loads.
"""

from __future__ import annotations

from types import ModuleType


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
