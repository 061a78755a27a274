"""Which weight matrices :func:`~tl_backward.lens.factors.gradient_factors` can factor, and the two
hook points each factor reads: the matrix's input x (forward) and its output z, whose gradient is δ.

Dense layers read the bridged linear module (``ModelAdapter.linear``). Mixture-of-experts layers
(tl_backward/core/moe.py) read the sparse block's input / output and the router's routing weights
for the experts' and router's factors, and the shared expert's bridged linear maps for
``shared_*`` (Qwen2-MoE).
"""

from __future__ import annotations

from typing import Any, Sequence

from tl_backward.core.adapter import get_adapter
from tl_backward.core.moe import SHARED_MODULES
from tl_backward.errors import TLBackwardError

# Module names -> TL weight name. Order is the display order.
MODULES = {
    "mlp_in": "W_in", "mlp_gate": "W_gate", "mlp_out": "W_out",
    "q": "W_Q", "k": "W_K", "v": "W_V", "o": "W_O", "router": "W_router",
    "shared_in": "W_shared_in", "shared_gate": "W_shared_gate", "shared_out": "W_shared_out",
    "shared_expert_gate": "W_shared_expert_gate",
}
ATTENTION = ("q", "k", "v", "o")


def factor_hooks(ad: Any, modules: Any, layers: Any) -> dict[tuple[int, str], tuple[str, ...]]:
    """(layer, module) -> (hook of the matrix's input x, hook of its output z, whose gradient is δ);
    on mixture-of-experts layers, the experts' and router modules read the three
    :attr:`MoELayer.hooks`, the shared expert's its :meth:`MoELayer.shared_hooks`."""
    hooks = {}
    for l in ad.layers(layers):
        for m in resolve_modules(ad, modules):
            if m in SHARED_MODULES:
                hooks[(l, m)] = _shared_pair(ad, l, m)
                continue
            moe = ad.moe(l) if m.startswith("mlp_") or m == "router" else None
            if m == "router" and moe is None:
                raise TLBackwardError(f"modules: 'router' exists only on mixture-of-experts layers; layer {l}'s "
                                      "MLP is dense", argument="modules")
            if m == "mlp_gate" and moe is not None and not moe.gated:
                raise TLBackwardError(f"modules: layer {l}'s experts are not gated (no gate projection); "
                                      "drop 'mlp_gate'", argument="modules")
            if moe is not None:
                hooks[(l, m)] = moe.hooks
            else:
                lin = ad.linear(l, m)
                hooks[(l, m)] = (lin.hook_in.name, lin.hook_out.name)
    return hooks


def _shared_pair(ad: Any, layer: int, module: str) -> tuple[str, str]:
    moe = ad.moe(layer)
    pair = None if moe is None else moe.shared_hooks(module)
    if pair is None:
        raise TLBackwardError(f"modules: {module!r} exists only on mixture-of-experts layers with a bridged "
                              f"shared expert (Qwen2-MoE); layer {layer} has none: drop it or pass layers= "
                              "without that layer", argument="modules")
    return pair


def factor_hook_names(model: Any, modules: str | Sequence[str] = ("mlp_in", "mlp_out"),
                      layers: int | Sequence[int] | None = None) -> list[str]:
    """The hook points :func:`factors_from_cache` reads (each matrix's input and output), for
    ``capture(names=...)``."""
    hooks = factor_hooks(get_adapter(model), modules, layers)
    return list(dict.fromkeys(n for pair in hooks.values() for n in pair))


def resolve_modules(ad: Any, modules: str | Sequence[str]) -> tuple[str, ...]:
    """Validate a ``modules`` argument: names from :data:`MODULES` or ``"all"`` (every module the
    model has: the MLP's unless attention-only, ``mlp_gate`` if gated, ``router`` on MoE, ``shared_*``
    with a shared expert)."""
    if isinstance(modules, str):
        if modules == "all":
            return tuple(m for m in MODULES if (not m.startswith("mlp_") or ad.has_mlp)
                         and (m != "mlp_gate" or ad.gated_mlp) and (m != "router" or ad.has_moe)
                         and (m not in SHARED_MODULES or ad.has_shared_expert))
        modules = (modules,)
    if not isinstance(modules, (list, tuple)) or not all(isinstance(m, str) for m in modules):
        raise TLBackwardError(f"modules must be a module name or a list of names from {list(MODULES)}, got "
                              f"{modules!r:.60}", argument="modules")
    if not modules:
        raise TLBackwardError(f"modules is empty: pass names from {list(MODULES)} or 'all'", argument="modules")
    for m in modules:
        if m not in MODULES:
            raise TLBackwardError(f"modules: unknown module {m!r}: choose from {list(MODULES)} (or 'all')",
                                  argument="modules")
        if m == "mlp_gate" and not ad.gated_mlp:
            raise TLBackwardError("modules: 'mlp_gate' exists only for gated MLPs (Llama-style); this model's MLP "
                                  "is not gated", argument="modules")
    return tuple(dict.fromkeys(modules))
