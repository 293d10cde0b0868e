"""Export: the bundle format (``load_pretrained``), checkpoint -> bundle
export, model cards and Hugging Face interop."""
