"""Mixture-of-experts references on a plain Hugging Face model (no TransformerLens, no tl_backward).

Each factor module of a sparse block is mapped, by hand, to the HF parameter it is the gradient of
and from that parameter's documented storage to TransformerLens layout ``[.., d_in, d_out]``:

- Mixtral / OLMoE / Qwen2-MoE / Qwen3-MoE experts: ``gate_up_proj [expert, 2·d_expert, d_model]``
  (rows ``[gate | up]``), ``down_proj [expert, d_model, d_expert]`` ([out, in]);
- GPT-OSS experts: ``gate_up_proj [expert, d_model, 2·d_expert]`` with gate and up *interleaved*
  (columns 0, 2, … are the gate), ``down_proj [expert, d_expert, d_model]`` ([in, out]);
- the router (``gate`` or, in GPT-OSS, ``router``) ``weight [expert, d_model]``;
- Qwen2-MoE's shared expert (``shared_expert.{gate,up,down}_proj``, an ``nn.Linear`` each) and its
  sigmoid gate ``shared_expert_gate [1, d_model]``: ``weight.T``.

Used by tests/conformance/cells.py and tests/lens/test_moe_factors.py.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def router_of(block: nn.Module) -> nn.Module:
    """The HF router of a sparse block (GPT-OSS ``router``, else ``gate``: never a gate projection)."""
    return block.router if hasattr(block, "router") else block.gate


def factor_parameters(block: nn.Module) -> dict[str, nn.Parameter]:
    """Factor module -> the HF parameter of ``block`` whose gradient it represents (``mlp_in`` and
    ``mlp_gate`` both live in ``gate_up_proj``)."""
    ex = block.experts
    params = {"mlp_in": ex.gate_up_proj, "mlp_gate": ex.gate_up_proj, "mlp_out": ex.down_proj,
              "router": router_of(block).weight}
    if hasattr(block, "shared_expert"):
        se = block.shared_expert
        params.update(shared_in=se.up_proj.weight, shared_gate=se.gate_proj.weight, shared_out=se.down_proj.weight,
                      shared_expert_gate=block.shared_expert_gate.weight)
    return params


def tl_layout(block: nn.Module, grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{module: gradient of factor_parameters(block)[module]}`` in TransformerLens layout: experts
    ``[expert, d_in, d_out]``, router ``[d_model, expert]``, shared maps ``[d_in, d_out]``."""
    gu = grads["mlp_in"]
    if _in_out(block):  # [expert, in, out], columns gate0, up0, gate1, ...
        gate, up = gu[..., 0::2], gu[..., 1::2]
    else:  # [expert, out, in], rows [gate | up]
        f = gu.shape[1] // 2
        gate, up = gu[:, :f].transpose(1, 2), gu[:, f:].transpose(1, 2)
    out = {"mlp_in": up, "mlp_gate": gate, "mlp_out": down_tl(block, grads["mlp_out"])}
    out.update({m: g.T for m, g in grads.items() if m not in out})  # nn.Linear weights [out, in]
    return out


def _in_out(block: nn.Module) -> bool:
    """GPT-OSS stores its experts [expert, in, out]; the other families [expert, out, in]."""
    return type(block.experts).__name__ == "GptOssExperts"


def down_tl(block: nn.Module, t: Tensor) -> Tensor:
    """A tensor shaped like ``experts.down_proj`` in TransformerLens layout ``[expert, d_expert, d_model]``."""
    return t if _in_out(block) else t.transpose(1, 2)


def expected_factors(blocks: dict[int, nn.Module], loss: Tensor) -> dict[tuple[int, str], Tensor]:
    """``{(layer, module): ∂loss/∂W}`` in TransformerLens layout for every factor module of the
    sparse ``blocks`` (``{layer: HF block}``), by ``torch.autograd.grad`` (no ``.grad`` written)."""
    per_layer = {l: factor_parameters(b) for l, b in blocks.items()}
    unique = list({id(p): p for ps in per_layer.values() for p in ps.values()}.values())
    grads = dict(zip(map(id, unique), torch.autograd.grad(loss, unique, retain_graph=True)))
    out = {}
    for l, params in per_layer.items():
        for m, g in tl_layout(blocks[l], {m: grads[id(p)] for m, p in params.items()}).items():
            out[(l, m)] = g
    return out
