"""Loading models: the embedded offline models, local HF directories, or hub names."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def load_model(name: str | None = None, *, device: str | torch.device | None = None,
               dtype: torch.dtype = torch.float32) -> Any:
    """Boot a ``TransformerBridge`` in eval mode, raw (no weight processing).

    ``name``: None for the embedded default model (offline), an embedded model's name
    (see :func:`list_models`), a local directory saved with ``save_pretrained`` (model and
    tokenizer), or a Hugging Face hub name such as ``"gpt2"`` (needs network access).
    """
    from transformer_lens import TransformerBridge

    if name is not None and not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be a string or a path, got {type(name).__name__}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
    embedded = _embedded_dir(None if name is None else str(name))
    directory = embedded or (Path(name) if name is not None and Path(name).is_dir() else None)
    if directory is not None:
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a per-tensor loading bar is noise for a 1 MB model
        try:
            hf = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype,
                                                      attn_implementation="eager")
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        tokenizer = PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)
        label = directory.name if embedded else str(directory)
        model = TransformerBridge.boot_transformers(label, hf_model=hf, tokenizer=tokenizer, device=device, dtype=dtype)
    else:
        try:
            model = TransformerBridge.boot_transformers(str(name), device=device, dtype=dtype)
        except (OSError, ValueError) as err:
            # Hub failures surface as OSError/ValueError deep inside transformers; say what was tried.
            raise ValueError(
                f"could not load model {name!r}: it is not an embedded model {list_models()}, not a local "
                f"directory, and the Hugging Face hub could not provide it ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''})"
            ) from err
    return model.eval()


def list_models() -> list[str]:
    """Names of the models shipped inside the package (usable offline)."""
    from .. import zoo

    lister = getattr(zoo, "list_models", None)
    return list(lister()) if lister else []


def _embedded_dir(name: str | None) -> Path | None:
    from .. import zoo

    default = getattr(zoo, "DEFAULT_MODEL", None)
    if name is None:
        if default is None or default not in list_models():
            raise RuntimeError("no embedded model is shipped in this install; pass a model name or directory")
        name = default
    if name in list_models():
        return Path(zoo.model_dir(name))
    return None
