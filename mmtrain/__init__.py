"""mmtrain: DeepSpeed-ZeRO training of masked-mixer and Llama language models.

``from mmtrain import load_pretrained`` loads an exported bundle (imports neither deepspeed nor
the training code: the loader is imported on first use).
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load_pretrained"]


def __getattr__(name):
    if name == "load_pretrained":
        from mmtrain.export.bundle import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'mmtrain' has no attribute {name!r}")
