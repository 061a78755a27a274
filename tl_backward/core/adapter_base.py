"""What every tl_backward model adapter offers, whatever TransformerLens class it wraps.

:class:`ModelAdapter` holds the backend-independent facts and helpers: hook names of the legacy
TransformerLens spelling (:data:`HOOKS`), layer checks, weights in TransformerLens layout,
the unembedding, tokenisation. Each backend subclasses it in its own file and adds what depends
on the model class (how Reversed Attention is read, the attention scale, the modules carrying a
weight's factors, MoE layers, the post-unembedding transform):

* :class:`tl_backward.core.adapter.BridgeAdapter` -- ``TransformerBridge`` (TransformerLens 3.9+);
* :class:`tl_backward.core.hooked.HookedAdapter` -- ``HookedTransformer`` (TransformerLens < 4).

:func:`tl_backward.core.adapter.get_adapter` picks the backend with ``isinstance``.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_backward.errors import TLBackwardError

from . import checks
from .attention_kinds import PatternRoute, ScoreRoute, Unsupported, ValueRoute
from .batch import Batch
from .device import input_device, module_device, param_dtype
from .moe import MoELayer
from .readout import Unembed
from .tokens import bos_prefix, decode_ids, encode_text, pad_token_id

HOOKS = {
    "pattern": "blocks.{l}.attn.hook_pattern",
    "attn_scores": "blocks.{l}.attn.hook_attn_scores",
    "q": "blocks.{l}.attn.hook_q",
    "k": "blocks.{l}.attn.hook_k",
    "v": "blocks.{l}.attn.hook_v",
    "z": "blocks.{l}.attn.hook_z",
    "rot_q": "blocks.{l}.attn.hook_rot_q",
    "rot_k": "blocks.{l}.attn.hook_rot_k",
    "cos": "blocks.{l}.attn.hook_cos",
    "sin": "blocks.{l}.attn.hook_sin",
    "attn_in": "blocks.{l}.ln1.hook_out",
    "ln1_in": "blocks.{l}.ln1.hook_in",
    "ln2_in": "blocks.{l}.ln2.hook_in",
    "attn_out": "blocks.{l}.hook_attn_out",
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "resid_mid": "blocks.{l}.hook_resid_mid",
    "resid_post": "blocks.{l}.hook_resid_post",
    "mlp_in": "blocks.{l}.mlp.hook_in",
    "mlp_pre": "blocks.{l}.mlp.hook_pre",
    "mlp_pre_linear": "blocks.{l}.mlp.hook_pre_linear",
    "mlp_post": "blocks.{l}.mlp.hook_post",
    "mlp_out": "blocks.{l}.hook_mlp_out",
}


def readout_input(hook_names: Any) -> str | None:
    """The hook at the unembedding's input (``[batch, pos, d_model]``, the very tensor ``W_U`` multiplies;
    a returned tensor replaces it), None if the model has none. Both backends name it ``unembed.hook_in``
    (TransformerLens 3.9's ``components/unembed.py`` fires it too); ``ln_final.hook_normalized`` would not
    do: it fires before the final norm's gain and bias."""
    return "unembed.hook_in" if "unembed.hook_in" in hook_names else None


class ModelAdapter:
    """Read-only facts about a TransformerLens model (base class of the backends; see module doc).

    Construct through :func:`tl_backward.core.adapter.get_adapter` (cached per model). Weights come
    back as fp32 detached copies in TransformerLens layout: ``W_Q [head, d_model, d_head]``,
    ``W_O [head, d_head, d_model]``, ``W_in``/``W_gate [d_model, d_mlp]``, ``W_out [d_mlp, d_model]``,
    ``W_U [d_model, d_vocab]``. Subclasses set :attr:`routes`, :attr:`rotary`, :attr:`rot_hooks`,
    :attr:`values_only_hooks` and, where they apply, :attr:`flattened_hooks` / :attr:`misfired_hooks`,
    and implement :meth:`attn_scale`, :meth:`linear`, :meth:`_moe_layer` and :attr:`logits_transform`.
    """

    hooks_table: dict[str, str] = HOOKS
    routes: tuple[ScoreRoute | ValueRoute | PatternRoute | Unsupported, ...] = ()
    rotary: bool = False
    rot_hooks: bool = False
    # Hook points fired on tensors the model has already consumed: forward values, no gradient.
    values_only_hooks: frozenset[str] = frozenset()
    # Norm hooks TransformerLens fires flattened [batch·pos, ...]; capture un-flattens them.
    flattened_hooks: frozenset[str] = frozenset()
    # Hook points whose tensor is not what their name says: capture refuses them by name and
    # leaves them out of filters (hook name -> why, and what to read instead).
    misfired_hooks: dict[str, str] = {}
    # Names capture() computes from another hook's activation: name -> (source hook, map).
    derived_hooks: dict[str, tuple[str, Callable[[Tensor], Tensor]]] = {}
    # Derived points whose gradient capture() computes too: name -> (hooks whose activations and hooks
    # whose gradients it reads, fn(activations, gradients) -> gradient); the others carry values only.
    derived_grads: dict[str, tuple[tuple[str, ...], tuple[str, ...], Callable[[dict, dict], Tensor]]] = {}
    # Hook points fired several times per forward on the same value; capture sums their gradients.
    summed_grad_hooks: frozenset[str] = frozenset()
    # Whether the blocks have an MLP at all (False: an attention-only HookedTransformer), any sparse
    # (mixture-of-experts) MLP, and a bridged shared expert (Qwen2-MoE): what modules="all" covers.
    has_mlp: bool = True
    has_moe: bool = False
    has_shared_expert: bool = False

    def __init__(self, model: Any):
        self.model = model
        cfg = model.cfg
        self.n_layers: int = cfg.n_layers
        self.n_heads: int = cfg.n_heads
        self.n_kv_heads: int = cfg.n_key_value_heads or cfg.n_heads
        self.d_head: int = cfg.d_head
        self.d_model: int = cfg.d_model
        self.d_mlp: int = cfg.d_mlp
        self.d_vocab: int = model.W_U.shape[-1]
        self.n_ctx: int = cfg.n_ctx
        self.gated_mlp: bool = bool(cfg.gated_mlp)
        self.parallel_blocks: bool = bool(cfg.parallel_attn_mlp)
        self._hook_names: frozenset[str] = frozenset(model.hook_dict)
        # The unembedding's input, gathered to the positions a metric reads (core/stream.py); the
        # hooks at the unembedding (legacy alias included), whose shapes that would change.
        self.readout_hooks: frozenset[str] = frozenset(
            n for n in self._hook_names if n.startswith("unembed.") or n == "hook_unembed")
        self.readout_input: str | None = readout_input(self._hook_names)
        self._moe: dict[int, MoELayer | None] = {}

    # ---------------------------------------------------------------- names
    def hook_name(self, kind: str, layer: int) -> str:
        """The TransformerLens hook name for ``kind`` at ``layer`` (see :data:`HOOKS`);
        negative layers count from the end."""
        if kind not in self.hooks_table:
            raise TLBackwardError(f"kind must be one of {sorted(self.hooks_table)}, got {kind!r}", argument="kind")
        layer = self.check_layer(layer)
        if kind == "resid_mid" and self.parallel_blocks:
            raise TLBackwardError(
                "this model has parallel attention+MLP blocks (GPT-NeoX style): there is no "
                "resid_mid; use resid_pre / resid_post", argument="kind")
        if kind == "mlp_pre_linear" and not self.gated_mlp:
            raise TLBackwardError("mlp_pre_linear exists only for gated MLPs; use mlp_pre", argument="kind")
        if kind in ("rot_q", "rot_k") and not self.rot_hooks:
            raise TLBackwardError(
                f"this model does not fire hook_{kind}: capture {kind[-1]}, cos and sin and use "
                "tl_backward.core.adapter.apply_rotary", argument="kind")
        if kind in ("cos", "sin") and not self.rotary:
            raise TLBackwardError(f"{kind} exists only for rotary models", argument="kind")
        return self.hooks_table[kind].format(l=layer)

    def check_layer(self, layer: int, argument: str = "layer") -> int:
        """``layer`` normalised to ``0..n_layers-1``; ``-1`` is the last layer (see core/checks.py)."""
        return checks.layer_index(layer, self.n_layers, argument)

    def layers(self, layers: int | Sequence[int] | None, argument: str = "layers", *,
               distinct: bool = True) -> list[int]:
        """Normalise a ``layers`` argument (None = all; negative counts from the end) to a checked
        list; repeated layers are refused unless ``distinct=False`` (see core/checks.py)."""
        return checks.layer_list(layers, self.n_layers, argument, distinct=distinct)

    @torch.no_grad()
    def forward_values(self, tokens: Int[Tensor, "batch pos"],
                       names: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """One forward pass (``run_with_cache``): the logits and the fp32 activations at ``names``, the
        derived points (:attr:`derived_hooks`) computed from their source hooks. A name whose hook never
        fired is absent (callers name what is missing)."""
        derived = {n: self.derived_hooks[n] for n in names if n in self.derived_hooks}
        real = list(dict.fromkeys([*(n for n in names if n not in derived), *(src for src, _ in derived.values())]))
        logits, cache = self.model.run_with_cache(tokens.to(input_device(self.model)), names_filter=real)
        fired = set(cache.keys())
        acts = {n: cache[n].detach().float() for n in real if n in fired}
        acts.update({n: derive(acts[src]) for n, (src, derive) in derived.items() if src in acts})
        return logits, {n: acts[n] for n in names if n in acts}

    def resolve_hook(self, name: str, argument: str = "names") -> str:
        """Validate a user hook name; unknown names get an error suggesting the closest."""
        if not isinstance(name, str):
            raise TLBackwardError(f"{argument}: hook names must be strings, got {type(name).__name__}",
                                  argument=argument)
        if name in self._hook_names:
            return name
        # The bridge rebuilds hook_dict (aliases included) on every access, ~0.3 ms: names are read
        # once and re-read only on a miss (e.g. after enable_compatibility_mode added aliases).
        self._hook_names = frozenset(self.model.hook_dict)
        if name in self._hook_names:
            return name
        hint = difflib.get_close_matches(name, sorted(self._hook_names), n=1, cutoff=0.5)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        if name.endswith("hook_resid_mid") and self.parallel_blocks:
            extra = " (parallel attention+MLP blocks have no resid_mid)"
        raise TLBackwardError(f"{argument}: unknown hook name {name!r}{extra}", argument=argument)

    def check_model(self) -> None:
        """Refuse a model whose hooks cannot be trusted for this call (run by every pass); the base accepts all."""

    # ---------------------------------------------------------------- attention
    def attn_scale(self, layer: int) -> float:
        """s such that ``attn_scores = q·kᵀ / s`` (before mask and soft-cap) at ``layer``."""
        raise NotImplementedError

    def ra_route(self, layer: int, feature: str = "Reversed Attention") -> ScoreRoute | ValueRoute | PatternRoute:
        """How ``feature`` (RA, attention patching) reads or edits attention at ``layer``; raises a
        ``TLBackwardError`` naming the reason where it cannot be exact."""
        route = self.routes[self.check_layer(layer)]
        if isinstance(route, Unsupported):
            route.refuse(feature)
        return route

    def forward_route(self, layer: int, feature: str) -> ScoreRoute | ValueRoute | PatternRoute:
        """As :meth:`ra_route`, for features that read attention *values* only (forward flow graphs): a
        layer whose gradients are off the autograd path but whose hooked pattern is the one used
        (``Unsupported.forward``) still serves."""
        route = self.routes[self.check_layer(layer)]
        if isinstance(route, Unsupported) and route.forward is not None:
            return route.forward
        return self.ra_route(layer, feature)

    def rotary_tables(self, layer: int, n_pos: int) -> tuple[Tensor, Tensor]:
        """cos, sin ``[n_pos, rot]`` (fp32, CPU) of ``layer``'s rotary embedding at positions 0..n_pos-1, in the
        ``rotate_half`` convention of :func:`tl_backward.core.adapter.apply_rotary`: ``R_pos x = x_r·cos +
        rotate_half(x_r)·sin`` on the first ``rot`` dims of the unrotated ``hook_q`` / ``hook_k``."""
        raise TLBackwardError(f"{type(self.model).__name__} is not a rotary model", argument="model")

    def require_pre_norm_blocks(self, feature: str) -> None:
        """Refuse ``feature`` where a block is not VISIT's pre-norm picture (one ln1 output feeds q, k and v,
        one ln2 output the MLP, each sublayer's output is added to the residual); backends add their cases."""

    def kv_head(self, head: int) -> int:
        """The key/value head that query head ``head`` reads (GQA)."""
        return head // (self.n_heads // self.n_kv_heads)

    # ---------------------------------------------------------------- weights (TL layout, fp32)
    def _attn(self, layer: int):
        return self.model.blocks[self.check_layer(layer)].attn

    def _mlp(self, layer: int):
        return self.model.blocks[self.check_layer(layer)].mlp

    @staticmethod
    def _get(module: Any, name: str, zeros: tuple[int, ...] | None = None) -> Tensor:
        try:
            value = getattr(module, name)
        except AttributeError:
            value = None
        if value is None:
            if zeros is None:
                raise TLBackwardError(f"this model has no {name}", argument="model")
            return torch.zeros(zeros)
        return value.detach().float().clone()

    def W_Q(self, layer: int) -> Float[Tensor, "head d_model d_head"]:
        return self._get(self._attn(layer), "W_Q")

    def W_K(self, layer: int) -> Float[Tensor, "kv_head d_model d_head"]:
        return self._get(self._attn(layer), "W_K")

    def W_V(self, layer: int) -> Float[Tensor, "kv_head d_model d_head"]:
        return self._get(self._attn(layer), "W_V")

    def W_O(self, layer: int) -> Float[Tensor, "head d_head d_model"]:
        return self._get(self._attn(layer), "W_O")

    def b_O(self, layer: int) -> Float[Tensor, " d_model"]:
        return self._get(self._attn(layer), "b_O", (self.d_model,))

    def W_in(self, layer: int) -> Float[Tensor, "d_model d_mlp"]:
        """FF1: the input projection (the *up* projection for gated MLPs)."""
        return self._get(self._mlp(layer), "W_in")

    def W_gate(self, layer: int) -> Float[Tensor, "d_model d_mlp"]:
        if not self.gated_mlp:
            raise TLBackwardError("W_gate exists only for gated MLPs", argument="model")
        return self._get(self._mlp(layer), "W_gate")

    def W_out(self, layer: int) -> Float[Tensor, "d_mlp d_model"]:
        return self._get(self._mlp(layer), "W_out")

    def b_in(self, layer: int) -> Float[Tensor, " d_mlp"]:
        return self._get(self._mlp(layer), "b_in", (self.d_mlp,))

    def b_out(self, layer: int) -> Float[Tensor, " d_model"]:
        return self._get(self._mlp(layer), "b_out", (self.d_model,))

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.model.W_U.detach().float()

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        b = getattr(self.model, "b_U", None)
        return torch.zeros(self.d_vocab) if b is None else b.detach().float()

    def linear(self, layer: int, module: str) -> Any:
        """An object whose ``hook_in.name`` / ``hook_out.name`` are the hook points carrying the factor x
        and the factor δ of ``module`` (in {q, k, v, o, mlp_in, mlp_gate, mlp_out}) at ``layer``."""
        raise NotImplementedError

    def mlp_out_weight(self, layer: int) -> tuple[Tensor, bool]:
        """``(parameter, out_in)``: the very parameter holding ``layer``'s dense MLP out-projection
        ``W_out`` (what Forward Pass Shift edits in place), and whether it is stored ``[out, in] =
        [d_model, d_mlp]`` (``out_in=True``: ``torch.nn.Linear``) rather than TransformerLens's
        ``[in, out] = [d_mlp, d_model]``. Raises a ``TLBackwardError`` where there is none."""
        raise NotImplementedError

    def require_dense_mlp(self, layers: Sequence[int], feature: str) -> None:
        """Refuse ``feature``, which reads one dense MLP's neurons (W_in columns, W_out rows,
        ``hook_post``), where a layer in ``layers`` has no such MLP; backends add their sparse cases."""
        if not self.has_mlp:
            raise TLBackwardError(f"{feature} reads the MLP's neurons (W_in columns, W_out rows, hook_post), but "
                                  "this model is attention-only: its blocks have no MLP", argument="model")

    def moe(self, layer: int) -> MoELayer | None:
        """``layer``'s sparse MLP (:class:`tl_backward.core.moe.MoELayer`), None if dense; cached."""
        layer = self.check_layer(layer)
        if layer not in self._moe:
            self._moe[layer] = self._moe_layer(layer)
        return self._moe[layer]

    def _moe_layer(self, layer: int) -> MoELayer | None:
        return None

    # ---------------------------------------------------------------- readout
    @torch.no_grad()
    def ln_final(self, v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The model's real final norm (gain and bias included), in fp32."""
        norm = self.model.ln_final
        return norm(v.to(device=module_device(norm), dtype=param_dtype(self.model))).float()

    @property
    def logits_transform(self):
        """The model's post-unembedding transform ``f`` (logits = ``f(ln_final(v) @ W_U + b_U)``), or None."""
        return None

    @property
    def unembedding(self) -> Unembed:
        """The readout ``v ↦ f(ln_final(v) @ W_U + b_U)`` (:class:`tl_backward.core.readout.Unembed`:
        full logits, probabilities, or chunked top/bottom-k, ranks and entropy for many vectors)."""
        return Unembed.of(self)

    @torch.no_grad()
    def unembed(self, v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        """Logit lens: ``f(ln_final(v) @ W_U + b_U)`` with ``f`` = :attr:`logits_transform`; reproduces the
        model's logits at the last layer."""
        return self.unembedding.logits(v)

    # ---------------------------------------------------------------- tokens
    @property
    def tokenizer(self):
        tok = getattr(self.model, "tokenizer", None)
        if tok is None:
            raise TLBackwardError("this model has no tokenizer: pass token ids (a LongTensor) instead of strings",
                                  argument="input")
        return tok

    @property
    def pad_id(self) -> int:
        """Padding id: the pad token, else EOS, else 0 (see core/tokens.py)."""
        return pad_token_id(getattr(self.model, "tokenizer", None))

    def encode(self, text: str, *, offsets: bool = False):
        """Ids of ``text`` without special tokens, and with ``offsets=True`` each token's
        ``(char_start, char_end)`` (:func:`tl_backward.core.tokens.encode_text`)."""
        return encode_text(self.tokenizer, text, offsets=offsets)

    def bos_ids(self, prepend_bos: bool) -> list[int]:
        """``[bos_token_id]`` when ``prepend_bos``, else ``[]`` (:func:`tl_backward.core.tokens.bos_prefix`)."""
        return bos_prefix(self.tokenizer, prepend_bos)

    def tokenize(self, input: Any, prepend_bos: bool | None = None, argument: str = "input") -> Batch:
        """Turn a string, a list of strings (right-padded) or token ids into a :class:`Batch`.

        Token tensors (``[pos]`` or ``[batch, pos]``, integer dtype) are taken as given, every
        position real; their ids are checked against the vocabulary before any embedding.
        """
        checks.flag(prepend_bos, "prepend_bos", none_ok=True)
        if isinstance(input, str):
            rows = [self._encode(input, prepend_bos, argument, argument)]
        elif isinstance(input, (list, tuple)):
            if not input:
                raise TLBackwardError(f"{argument} is an empty list: pass at least one prompt", argument=argument)
            if not all(isinstance(s, str) for s in input):
                raise TLBackwardError(f"{argument} lists must hold strings; pass token ids as a LongTensor "
                                      "[batch, pos]", argument=argument)
            rows = [self._encode(s, prepend_bos, argument, f"{argument}[{i}]") for i, s in enumerate(input)]
        elif isinstance(input, Tensor):
            rows = list(checks.token_tensor(input, argument, self.d_vocab).cpu())
        else:
            raise TLBackwardError(
                f"{argument} must be a string, a list of strings or a LongTensor of token ids, got "
                f"{type(input).__name__}", argument=argument)
        return self._check_length(Batch.from_rows(rows, self.pad_id), argument)

    def _encode(self, text: str, prepend_bos: bool | None, argument: str, what: str) -> Tensor:
        if not text.strip():
            raise TLBackwardError(f"{what} is empty: pass a non-empty prompt", argument=argument)
        ids = self.model.to_tokens(text, prepend_bos=prepend_bos, truncate=False)[0].cpu()
        if ids.numel() == 0:
            raise TLBackwardError(f"{what} tokenises to nothing", argument=argument)
        return ids

    def _check_length(self, batch: Batch, argument: str = "input", what: str = "") -> Batch:
        if batch.tokens.shape[1] > self.n_ctx:
            raise TLBackwardError(
                f"{what or argument} is {batch.tokens.shape[1]} tokens long but the model's context (n_ctx) is "
                f"{self.n_ctx}: shorten the prompt", argument=argument)
        return batch

    def target_tokens(self, target: Any, argument: str = "target") -> Int[Tensor, " target"]:
        """Token ids of a target: a string (tokenised without BOS), an int, or ids."""
        if isinstance(target, str):
            if not target.strip():
                raise TLBackwardError(f"{argument} is empty: pass a word such as ' Paris' or a token id",
                                      argument=argument)
            ids = self.model.to_tokens(target, prepend_bos=False, truncate=False)[0].cpu()
            if ids.numel() == 0:
                raise TLBackwardError(f"{argument} {target!r} tokenises to nothing", argument=argument)
            unk = getattr(self.tokenizer, "unk_token_id", None)
            if unk is not None and bool((ids == unk).any()) and target.strip() != self.tokenizer.unk_token:
                raise TLBackwardError(f"{argument} {target!r} is not in the model's vocabulary (it tokenises to "
                                      "the unknown token)", argument=argument)
            return ids.long()
        if isinstance(target, bool):
            raise TLBackwardError(f"{argument} must be a string, an int token id or a sequence of ids, not a bool",
                                  argument=argument)
        if checks.is_int(target):
            target = [int(target)]
        if isinstance(target, (list, tuple)) and target and all(checks.is_int(t) for t in target):
            target = torch.tensor([int(t) for t in target])
        if isinstance(target, Tensor):
            return checks.token_tensor(target.reshape(-1), argument, self.d_vocab)[0].cpu()
        raise TLBackwardError(f"{argument} must be a string, an int token id or a sequence of ids, got "
                              f"{type(target).__name__} {target!r:.40}", argument=argument)

    def decode_ids(self, ids: Sequence[int] | Tensor) -> list[str]:
        """One display string per vocabulary id (see :func:`decode_ids`)."""
        return decode_ids(getattr(self.model, "tokenizer", None), ids)

    def to_str_tokens(self, tokens: Int[Tensor, "batch pos"], mask: Tensor | None = None) -> list[list[str]]:
        """Token strings per row (padding dropped when ``mask`` is given)."""
        return [self.decode_ids(row if mask is None else row[mask[i]]) for i, row in enumerate(tokens)]

