"""One registry of tiny random Hugging Face configs for every decoder-only family the conformance
suite measures (tests/conformance), and the function that boots them as TransformerBridges.

Each family: 2 layers, hidden 32 (GPT-OSS 64), 4 heads, 2 kv heads where the family has GQA,
vocabulary = the word tokenizer (tl_backward/zoo/tiny.py: SPECIALS + TINY_WORDS), eager attention,
no dropout, a fixed seed per family; matrices N(0, 0.1) and every 1-D parameter (norm gains, biases,
sinks) perturbed by N(0, 0.1), so that a dropped gain or bias changes the numbers.
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from tl_backward.zoo.tiny import SPECIALS, TINY_WORDS, word_tokenizer

VOCAB = len(SPECIALS) + len(TINY_WORDS)
LAYERS, D, HEADS, KV, MLP, CTX = 2, 32, 4, 2, 64, 64
COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _llama_like(**extra) -> dict:
    base = dict(num_hidden_layers=LAYERS, hidden_size=D, num_attention_heads=HEADS, num_key_value_heads=KV,
                intermediate_size=MLP, max_position_embeddings=CTX, tie_word_embeddings=False)
    base.update(extra)
    return base


def _moe(**extra) -> dict:
    return _llama_like(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=MLP,
                       **extra)


@dataclass(frozen=True)
class Family:
    """A family: its transformers config class name and the kwargs of a tiny instance."""

    name: str
    config: str
    kwargs: dict = field(default_factory=dict)
    # 1/√d_head multiplies q·kᵀ unless the HF attention module says otherwise (GPT-Neo: no scaling).
    unscaled: bool = False
    fast: bool = False

    @property
    def seed(self) -> int:
        return zlib.crc32(self.name.encode()) % 10_000


_G2 = dict(head_dim=D // HEADS, query_pre_attn_scalar=D // HEADS, hidden_activation="gelu_pytorch_tanh")
FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("gpt2", "GPT2Config", dict(n_layer=LAYERS, n_embd=D, n_head=HEADS, n_positions=CTX, n_inner=MLP,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), fast=True),
    Family("gpt_neox", "GPTNeoXConfig", dict(num_hidden_layers=LAYERS, hidden_size=D, num_attention_heads=HEADS,
                                             intermediate_size=MLP, max_position_embeddings=CTX, rotary_pct=0.5,
                                             use_parallel_residual=True), fast=True),
    Family("llama", "LlamaConfig", _llama_like(), fast=True),
    Family("mistral", "MistralConfig", _llama_like(sliding_window=4)),
    Family("qwen2", "Qwen2Config", _llama_like()),
    Family("qwen3", "Qwen3Config", _llama_like(head_dim=D // HEADS)),
    Family("gemma", "GemmaConfig", _llama_like(head_dim=D // HEADS, hidden_activation="gelu_pytorch_tanh")),
    Family("gemma2", "Gemma2Config", _llama_like(**_G2, attn_logit_softcapping=2.0, final_logit_softcapping=None,
                                                 sliding_window=4)),
    Family("gemma3", "Gemma3TextConfig", _llama_like(**_G2, sliding_window=4)),
    Family("phi", "PhiConfig", _llama_like(num_key_value_heads=HEADS, partial_rotary_factor=0.5, resid_pdrop=0.0,
                                           embd_pdrop=0.0, attention_dropout=0.0)),
    Family("phi3", "Phi3Config", _llama_like(pad_token_id=0)),
    Family("olmo", "OlmoConfig", _llama_like()),
    Family("olmo2", "Olmo2Config", _llama_like()),
    Family("falcon", "FalconConfig", dict(num_hidden_layers=LAYERS, hidden_size=D, num_attention_heads=HEADS,
                                          multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                                          bias=False, alibi=False, max_position_embeddings=CTX)),
    Family("stablelm", "StableLmConfig", _llama_like(partial_rotary_factor=0.5)),
    Family("gpt_bigcode", "GPTBigCodeConfig", dict(n_layer=LAYERS, n_embd=D, n_head=HEADS, n_positions=CTX,
                                                   n_inner=MLP, multi_query=True, resid_pdrop=0.0, embd_pdrop=0.0,
                                                   attn_pdrop=0.0)),
    Family("cohere", "CohereConfig", _llama_like(logit_scale=0.5)),
    Family("granite", "GraniteConfig", _llama_like(embedding_multiplier=2.0, attention_multiplier=0.3,
                                                   residual_multiplier=0.7, logits_scaling=1.5)),
    Family("starcoder2", "Starcoder2Config", _llama_like(residual_dropout=0.0, embedding_dropout=0.0)),
    Family("glm", "GlmConfig", _llama_like(head_dim=D // HEADS)),
    Family("bloom", "BloomConfig", dict(n_layer=LAYERS, hidden_size=D, n_head=HEADS)),
    Family("mpt", "MptConfig", dict(n_layers=LAYERS, d_model=D, n_heads=HEADS, max_seq_len=CTX, expansion_ratio=2)),
    Family("smollm3", "SmolLM3Config", _llama_like(no_rope_layer_interval=2)),
    Family("gptj", "GPTJConfig", dict(n_layer=LAYERS, n_embd=D, n_head=HEADS, n_positions=CTX, n_inner=MLP,
                                      rotary_dim=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    Family("opt", "OPTConfig", dict(num_hidden_layers=LAYERS, hidden_size=D, num_attention_heads=HEADS, ffn_dim=MLP,
                                    word_embed_proj_dim=D, max_position_embeddings=CTX, dropout=0.0)),
    Family("gpt_neo", "GPTNeoConfig", dict(num_layers=LAYERS, hidden_size=D, num_heads=HEADS, intermediate_size=MLP,
                                           max_position_embeddings=CTX, attention_types=[[["global", "local"], 1]],
                                           window_size=4, resid_dropout=0.0, embed_dropout=0.0,
                                           attention_dropout=0.0), unscaled=True),
    Family("mixtral", "MixtralConfig", _moe()),
    Family("olmoe", "OlmoeConfig", _moe()),
    Family("qwen2_moe", "Qwen2MoeConfig", _moe(shared_expert_intermediate_size=MLP, decoder_sparse_step=1)),
    Family("qwen3_moe", "Qwen3MoeConfig", _moe(head_dim=D // HEADS, decoder_sparse_step=1)),
    Family("gpt_oss", "GptOssConfig", _moe(hidden_size=64, head_dim=16, intermediate_size=64,
                                           layer_types=["sliding_attention", "full_attention"], sliding_window=4)),
    Family("codegen", "CodeGenConfig", dict(n_layer=LAYERS, n_embd=D, n_head=HEADS, n_positions=CTX, n_inner=MLP,
                                            rotary_dim=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
]}
FAST = tuple(name for name, f in FAMILIES.items() if f.fast)


def hf_model(name: str) -> torch.nn.Module:
    """A fresh random tiny HF causal LM of family ``name`` (eval mode, fp32, eager attention)."""
    import transformers
    from transformers import AutoModelForCausalLM

    fam = FAMILIES[name]
    cfg = getattr(transformers, fam.config)(**{**COMMON, **fam.kwargs})
    cfg._attn_implementation = "eager"
    torch.manual_seed(fam.seed)
    hf = AutoModelForCausalLM.from_config(cfg).float().eval()
    hf.config.architectures = [type(hf).__name__]  # TransformerLens picks its adapter from this
    gen = torch.Generator().manual_seed(fam.seed)
    with torch.no_grad():
        for p in hf.parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(0.1 * noise)
            else:
                p.add_(0.1 * noise)
    return hf


def build(name: str) -> tuple[torch.nn.Module, Any]:
    """``(hf, bridge)``: ``hf`` is an untouched copy of the weights the bridge wraps (the independent
    reference); the bridge is booted with ``TransformerBridge.boot_transformers(name, hf_model=...,
    tokenizer=word_tokenizer())`` and put in eval mode."""
    from tl_backward.core.compat import TransformerBridge

    wrapped = hf_model(name)
    reference = copy.deepcopy(wrapped)
    bridge = TransformerBridge.boot_transformers(f"tiny-{name}", hf_model=wrapped, tokenizer=word_tokenizer())
    return reference, bridge.eval()


Builder = Callable[[str], tuple[torch.nn.Module, Any]]
