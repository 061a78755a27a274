"""Fine-tuning under the MAS mask (and the causal baseline with everything else equal).

Models are pre-trained causally, so MAS needs fine-tuning. The loss is the mean next-token NLL over
*answer* tokens only (``Segments.target``): under MAS a block token sees its own next token, so a
prompt-token loss would leak. The causal arm runs the identical code with every segment id set to
-1 (same tokens, padding, positions, batches, seeds), so only the mask differs.

These functions change the weights **in place** (that is their point); undo with
``with preserving_weights(model): ...`` or :func:`snapshot_weights` / :func:`restore_weights`. The model is left in eval mode with no parameter ``.grad``; requires_grad flags
are restored. LoRA (``lora=``) needs the optional ``peft`` dependency (``pip install
tl_backward[lora]``); adapters go on the attention q/v projections by default (the paper's recipe)
and are merged into the weights at the end, so the returned model is a plain Bridge again.
A ``transformer_lens.HookedTransformer`` fine-tunes the same way (its forward under the mask:
``hooked.py``), without LoRA: its weights are parameters like ``W_Q [head, d_model, d_head]``, not
the Linear modules peft adapts.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tl_backward.core.device import input_device, model_devices, on
from tl_backward.core.stream import picked_readout
from tl_backward.core.sweep import rank_and_world

from ..core import checks
from ..core.compat import is_hooked_transformer
from ..core.lock import model_lock
from ..errors import TLBackwardError
from .context import forward_module, hf_module, run_segments
from .segments import Segments, concat

MASKS = ("mas", "causal")
LORA_DEFAULTS = {"r": 32, "lora_alpha": 64, "lora_dropout": 0.05, "modules": ("q", "v")}


@dataclass(frozen=True)
class FinetuneResult:
    """What a fine-tuning run did: the mask, the per-step answer losses and the settings."""

    mask: str
    losses: Float[Tensor, " step"]
    steps: int
    epochs: int
    lr: float
    batch_size: int
    seed: int
    lora: bool

    def __repr__(self) -> str:
        loss = f", loss {float(self.losses[0]):.4g} → {float(self.losses[-1]):.4g}" if self.losses.numel() else ""
        return (f"FinetuneResult({self.mask}, {self.steps} steps / {self.epochs} epochs{loss}, lr {self.lr:g}, "
                f"batch {self.batch_size}, seed {self.seed}{', LoRA' if self.lora else ''})")


def snapshot_weights(model: Any) -> dict[str, Tensor]:
    """A detached copy of every weight (``model.state_dict()``), to undo a fine-tune later."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def restore_weights(model: Any, snapshot: dict[str, Tensor]) -> None:
    """Copy ``snapshot`` (from :func:`snapshot_weights`) back into the model's weights in place."""
    with torch.no_grad():
        model.load_state_dict(snapshot)


@contextmanager
def preserving_weights(model: Any) -> Iterator[dict[str, Tensor]]:
    """Fine-tune inside the block; on exit (also after an error) the weights are restored exactly.

    Why not ``copy.deepcopy(model)``: TransformerLens 4.3 bridges keep weak proxies to their own
    submodules inside forward hooks; a deep copy keeps pointing at the original's modules (and
    raises ``ReferenceError`` once the original is gone). Restoring weights in place avoids that.
    """
    with model_lock(model):  # other threads wait until the weights are restored (core/lock.py)
        snapshot = snapshot_weights(model)
        try:
            yield snapshot
        finally:
            restore_weights(model, snapshot)


def answer_loss(model: Any, segments: Segments, *, mask: str = "mas") -> Float[Tensor, ""]:
    """Mean NLL of the answer tokens: ``-mean_{t: target[t]} log p(tokens[t] | context of t-1)``.

    The logits at position ``t - 1`` score token ``t``; ``mask`` picks the MAS or the causal mask
    (both given as explicit 4-D masks with the segments' position ids). Differentiable.
    """
    checks.one_of(mask, "mask", MASKS)
    if not isinstance(segments, Segments):
        raise TLBackwardError(f"segments must be a tl_backward.segments.Segments, got {type(segments).__name__}",
                              argument="segments")
    seg = _check_answers(segments, "segments")
    return _answer_nll_sum(model, seg, mask) / int(seg.target[:, 1:].sum())


def _answer_nll_sum(model: Any, segments: Segments, mask: str) -> Float[Tensor, ""]:
    """``Σ_{t: target[t]} -log p(tokens[t] | context of t-1)`` (differentiable), for checked segments."""
    seg = segments.to(input_device(forward_module(model)))
    # Position t predicts token t + 1: only the answer positions are unembedded (core/stream.py).
    rows, positions = seg.target[:, 1:].nonzero(as_tuple=True)
    with picked_readout(model, rows, positions) as pick:
        logits = pick(run_segments(model, seg if mask == "mas" else seg.causal()))
    logp = logits.float().log_softmax(-1)  # on the unembedding's device (the last of a split model)
    return -logp.gather(-1, on(seg.tokens[rows, positions + 1], logp)[:, None]).sum()


def _train_step(model: Any, data: Segments, idx: Tensor, mask: str, params: list[Tensor], opt: Any,
                max_grad_norm: float | None) -> float:
    """One AdamW step on the global batch ``idx``; returns its mean answer NLL.

    Under ``torchrun`` rank r computes rows ``idx[r::world]`` and the gradients are summed over the
    ranks: with S_r the rank's NLL sum and N the batch's answer-token count,
    ``Σ_r ∂(S_r / N)/∂θ = ∂(mean NLL)/∂θ`` -- the single-process gradient (DDP's all-reduce, with
    the global token count instead of a per-rank mean). Every rank then takes the same step.
    """
    rank, world = rank_and_world()
    total = int(data.select(idx).target[:, 1:].sum())
    mine = idx[rank::world]
    opt.zero_grad(set_to_none=True)
    part = torch.zeros((), dtype=torch.float64)
    if len(mine):
        nll = _answer_nll_sum(model, data.select(mine), mask)
        (nll / total).backward()
        part = nll.detach().double().cpu()
    if world > 1:
        part = _sum_over_ranks(params, part)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    return float(part) / total


def _sum_over_ranks(params: list[Tensor], loss_sum: Tensor) -> Tensor:
    """All-reduce the gradients (one flat buffer) and the loss sum. A parameter keeps ``grad=None``
    only if it got no gradient on any rank, so AdamW skips it exactly as in one process."""
    dist = torch.distributed
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    dist.all_reduce(has)
    live = [p for p, h in zip(params, has.tolist()) if h]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_device: dict[torch.device, list[Tensor]] = {}
    for p in live:  # one flat buffer per device (a dispatched model's parameters sit on several)
        by_device.setdefault(p.grad.device, []).append(p)
    for group in by_device.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        for p, g in zip(group, flat.split([p.numel() for p in group])):
            p.grad.copy_(g.view_as(p))
    loss_sum = loss_sum.to(live[0].device if live else "cpu")
    dist.all_reduce(loss_sum)
    return loss_sum.cpu()


def _check_answers(seg: Segments, argument: str) -> Segments:
    if not seg.target[:, 1:].any(-1).all():
        raise TLBackwardError(f"{argument}: every row needs answer tokens (Segments.target) after its first "
                              "position; build the data with an answer, e.g. segments.from_blocks(model, blocks, "
                              "answer)", argument=argument)
    return seg


def _as_dataset(data: Segments | Sequence[Segments]) -> Segments:
    if isinstance(data, Segments):
        return _check_answers(data, "dataset")
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, Segments) for d in data):
        return _check_answers(concat(list(data)), "dataset")
    raise TLBackwardError("dataset must be a Segments batch or a non-empty list of Segments", argument="dataset")


def _check_lora(lora: Any) -> None:
    """``lora``: None, True or a dict of the keys :func:`_inject_lora` accepts (checked before any import)."""
    if lora is None or lora is True:
        return
    if not isinstance(lora, dict):
        raise TLBackwardError(f"lora must be None, True or a dict(r=, lora_alpha=, lora_dropout=, modules=), got "
                              f"{lora!r:.40}", argument="lora")
    unknown = set(lora) - set(LORA_DEFAULTS)
    if unknown:
        raise TLBackwardError(f"lora: unknown keys {sorted(unknown)}; allowed {sorted(LORA_DEFAULTS)}",
                              argument="lora")


def _lora_targets(model: Any, modules: Sequence[str]) -> list[str]:
    """Names (inside ``model.original_model``) of the Linear/Conv1D behind ``blocks[l].attn.<m>``."""
    hf = hf_module(model)
    names = {id(mod): name for name, mod in hf.named_modules()}
    out = []
    for blk in model.blocks:
        for m in modules:
            bridge = getattr(blk.attn, m, None)
            inner = getattr(bridge, "original_component", None)
            if inner is None or id(inner) not in names:
                raise TLBackwardError(f"lora: attention module {m!r} not found on this bridge (try 'q', 'k', 'v', "
                                      "'o')", argument="lora")
            out.append(names[id(inner)])
    return out


def _inject_lora(model: Any, lora: Any) -> list[Any]:
    try:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("lora= needs peft: pip install 'tl_backward[lora]' (or pip install peft)") from exc
    _check_lora(lora)
    opts = dict(LORA_DEFAULTS)
    if isinstance(lora, dict):
        opts.update(lora)
    targets = _lora_targets(model, opts.pop("modules"))
    hf = hf_module(model)
    inject_adapter_in_model(LoraConfig(target_modules=targets, bias="none", **opts), hf)
    return [m for m in hf.modules() if isinstance(m, LoraLayer)]


def _merge_lora(model: Any, layers: list[Any], had_config: bool = False) -> None:
    """Fold every adapter into its base weight, put the base module back in place, and drop the
    ``peft_config`` attribute peft's injection left on the HF model (unless it was there before)."""
    hf = hf_module(model)
    ids = {id(layer) for layer in layers}
    for parent in list(hf.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in ids:
                child.merge()
                parent._modules[child_name] = child.get_base_layer()
    if not had_config and "peft_config" in vars(hf):
        del hf.peft_config


def finetune(
    model: Any,
    dataset: Segments | Sequence[Segments],
    *,
    mask: str = "mas",
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 8,
    lora: Any = None,
    seed: int = 0,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    progress: bool = True,
    on_step: Callable[[int, float, Tensor], Any] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` in place on answer tokens under the ``mask`` ("mas" or "causal").

    AdamW, constant learning rate, mini-batches drawn by a ``seed``-ed permutation each epoch;
    dropout randomness is seeded too (inside ``torch.random.fork_rng``, so the caller's global RNG
    state is untouched). ``lora=True`` or ``dict(r=32, lora_alpha=64, lora_dropout=0.05,
    modules=("q", "v"))`` trains peft LoRA adapters instead of all weights and merges them.
    Every argument is checked before the model is touched: ``lr`` finite and > 0,
    ``weight_decay`` finite and >= 0, ``max_grad_norm`` finite and > 0 (or None: no clipping).
    If the run fails, requires_grad flags and train/eval modes are restored as they were.
    Under ``torchrun`` every rank computes its share of each global batch and all ranks take the
    same step (gradients summed over the ranks, scaled by the global answer-token count), so the weights equal a one-process run's within fp32
    tolerance -- exactly so only without dropout (each rank draws its own dropout masks).
    ``on_step(step, loss, rows)`` is called after every optimiser step (``step`` from 1, the batch's
    mean answer NLL, the batch's row indices; the model in train mode with live LoRA adapters); a
    truthy return stops training early (``result.steps`` counts the steps taken). It may evaluate
    the model (switch to eval mode and back: eval forwards draw no random numbers, so the training
    run is unchanged).
    """
    checks.one_of(mask, "mask", MASKS)
    epochs = checks.count(epochs, "epochs", minimum=1)
    batch_size = checks.count(batch_size, "batch_size", minimum=1)
    lr = checks.finite_float(lr, "lr", positive=True, hint="the learning rate")
    weight_decay = checks.finite_float(weight_decay, "weight_decay", minimum=0.0)
    max_grad_norm = checks.finite_float(max_grad_norm, "max_grad_norm", positive=True, none_ok=True,
                                        hint="None for no clipping")
    seed = checks.count(seed, "seed", hint="seeds the batch order and dropout")
    checks.flag(progress, "progress")
    if on_step is not None and not callable(on_step):
        raise TLBackwardError(f"on_step must be None or a callable (step, loss, rows), got {type(on_step).__name__}",
                              argument="on_step")
    _check_lora(lora)
    data = _as_dataset(dataset)
    hf = forward_module(model)
    if lora is not None and is_hooked_transformer(model):
        raise TLBackwardError("lora= needs a TransformerBridge: a HookedTransformer holds its weights as parameters "
                              "(W_Q [head, d_model, d_head], ...), not the Linear modules peft adapts; pass lora=None "
                              "to train all weights", argument="lora")
    device = input_device(hf)
    n = len(data)
    steps = epochs * math.ceil(n / batch_size)
    layers: list[Any] = []
    losses: list[float] = []
    # The lock: flags, train mode and weights change for the whole run (core/lock.py).
    accelerators = [d for d in model_devices(hf) if d.type != "cpu"]  # every GPU of a dispatched model
    with model_lock(model), torch.random.fork_rng(devices=accelerators):
        flags = {p: p.requires_grad for p in model.parameters()}  # read under the lock
        modes = [(m, m.training) for m in model.modules()]
        had_config = "peft_config" in vars(hf)
        done = False
        torch.manual_seed(seed)
        try:
            if lora is not None:
                for p in model.parameters():
                    p.requires_grad_(False)
                layers = _inject_lora(model, lora)
                params = [p for layer in layers for n_, p in layer.named_parameters() if "lora_" in n_]
            else:
                params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise TLBackwardError("no trainable parameters (all requires_grad=False)", argument="model")
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
            order = torch.Generator().manual_seed(seed)
            model.train()
            bar = _progress(steps, progress, f"{mask} fine-tune")
            stop = False
            for _ in range(epochs):
                perm = torch.randperm(n, generator=order)
                for i in range(0, n, batch_size):
                    rows = perm[i : i + batch_size]
                    losses.append(_train_step(model, data, rows, mask, params, opt, max_grad_norm))
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
                    stop = on_step is not None and bool(on_step(len(losses), losses[-1], rows))
                    if stop:
                        break
                if stop:
                    break
            bar.close()
            opt.zero_grad(set_to_none=True)
            done = True
        finally:
            if layers:
                with torch.no_grad():
                    _merge_lora(model, layers, had_config)
            for p, flag in flags.items():
                p.requires_grad_(flag)
                p.grad = None
            model.eval()
            if not done:  # a failed run leaves the modes as found (a finished one: eval, as documented)
                for m, mode in modes:
                    m.training = mode
    return FinetuneResult(mask, torch.tensor(losses), len(losses), epochs, lr, batch_size, seed, lora is not None)


def mas_finetune(model: Any, dataset: Segments | Sequence[Segments], **kwargs: Any) -> FinetuneResult:
    """:func:`finetune` with the MAS mask (changes weights in place; see the module docstring)."""
    return finetune(model, dataset, mask="mas", **kwargs)


def causal_finetune(model: Any, dataset: Segments | Sequence[Segments], **kwargs: Any) -> FinetuneResult:
    """:func:`finetune` with the plain causal mask: the fair baseline for :func:`mas_finetune`."""
    return finetune(model, dataset, mask="causal", **kwargs)


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)
