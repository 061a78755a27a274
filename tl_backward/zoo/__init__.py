"""The zoo: a synthetic world, a word-level tokenizer and small models trained on it.

Shipped models live in ``tl_backward/zoo/models/<name>/`` as standard HF directories
(``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``) plus a
model card (``card.md``, and ``card.json`` with the measured figures). They load fully offline::

    AutoModelForCausalLM.from_pretrained(model_dir(name), local_files_only=True)
    PreTrainedTokenizerFast.from_pretrained(model_dir(name))

The zoo is data: it never imports tl_backward's methods.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import TLBackwardError

MODELS_DIR = Path(__file__).parent / "models"
DEFAULT_MODEL = "facts-gpt2"
_KNOWN = ("facts-gpt2", "facts-llama")


def list_models() -> list[str]:
    """Names of the embedded models that are present in this installation (default first)."""
    return [n for n in _KNOWN if (MODELS_DIR / n / "config.json").is_file()]


def model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The directory of embedded model ``name``; ValueError naming the known models otherwise."""
    if not isinstance(name, str):
        raise TLBackwardError(f"name must be a str, one of {list_models()}, got {type(name).__name__}", argument="name")
    if name not in list_models():
        raise TLBackwardError(f"unknown embedded model {name!r}; known models: {list_models()}", argument="name")
    return MODELS_DIR / name


def model_card(name: str = DEFAULT_MODEL) -> dict:
    """The card of ``name`` as a dict (``card.json``): config, training time and ``figures``
    (``fact_recall``, ``paraphrase_recall``, ``icl``, ``icl_gain_5_vs_0``, ``segment_qa``)."""
    return json.loads((model_dir(name) / "card.json").read_text())


__all__ = ["DEFAULT_MODEL", "MODELS_DIR", "list_models", "model_card", "model_dir"]
