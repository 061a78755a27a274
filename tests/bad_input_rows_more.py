"""Rows of the bad-input table, part 2: VISIT flow graphs and findings, MAS segments, masks,
generation and fine-tuning. Each row: (name, call(env), a word the message must contain[, type]).
"""

from __future__ import annotations

import torch

import tl_backward as tlb
from tl_backward.attention import ra_hook_names, reversed_attention_from_cache
from tl_backward.flow import flow_hook_names, ln_filter, merge, regularisation_neurons
from tl_backward.lens import factor_hook_names, factors_from_cache, lens_from_factors
from tl_backward.masking import answer_loss, attention_patterns, finetune
from tl_backward.masking import segments as S
from tests.bad_inputs import NLL, PROMPT, TARGET, Row, reenter

R = Row
nan, inf = float("nan"), float("inf")
LONG = torch.long
TOKENS = torch.tensor([[1, 5, 6, 7, 8]])
SEG_IDS = torch.tensor([[0, 0, 0, -1, -1]])


def flow(e, **kw):
    kw.setdefault("layer", 0)
    return tlb.flow_graph(e.gpt2, kw.pop("input", PROMPT), **kw)


def from_ids(**kw):
    args = dict(tokens=TOKENS, segment_ids=SEG_IDS) | kw
    return S.from_ids(args.pop("tokens"), args.pop("segment_ids"), **args)


def spans(value, tokens=TOKENS, **kw):
    return S.from_spans(tokens, value, **kw)


def blocks(e, value=("the cat sat",), answer="on the mat", **kw):
    return S.from_blocks(e.gpt2, list(value) if isinstance(value, tuple) else value, answer, **kw)


def delim(e, text="the cat ### sat", delimiter="###", **kw):
    return S.from_delimiter(e.gpt2, text, delimiter, **kw)


def chat(e, messages, **kw):
    return S.from_chat(e.gpt2, messages, **kw)


def masked(e, segments, model=None):
    with tlb.segment_mask(model or e.gpt2, segments):
        pass


def nested_masks(e):
    with tlb.segment_mask(e.gpt2, e.seg):
        with tlb.segment_mask(e.gpt2, e.seg):
            pass


def masked_forward(e, tokens):
    with tlb.segment_mask(e.gpt2, e.seg):
        e.gpt2(tokens)


def generate(e, segments=None, **kw):
    kw.setdefault("max_new_tokens", 2)
    return tlb.mas_generate(e.gpt2, e.seg if segments is None else segments, **kw)


def tune(e, dataset=None, **kw):
    kw.setdefault("progress", False)
    return finetune(e.gpt2, e.seg if dataset is None else dataset, **kw)


def oov_segments():
    return S.from_ids(torch.tensor([[1, 5, 10**4]]), torch.tensor([[0, 0, -1]]))


def long_segments():
    return S.from_ids(torch.full((1, 70), 5), torch.full((1, 70), -1))


FLOW = [
    R("flow_graph layer=5", lambda e: flow(e, layer=5), "layer"),
    R("flow_graph layer=1.5", lambda e: flow(e, layer=1.5), "layer"),
    R("flow_graph layer=[0, 0]", lambda e: flow(e, layer=[0, 0]), "layer"),
    R("flow_graph layer='0'", lambda e: flow(e, layer="0"), "layer"),
    R("flow_graph input batch of 2", lambda e: flow(e, input=["the cat", "a dog"]), "input"),
    R("flow_graph input=42", lambda e: flow(e, input=42), "input"),
    R("flow_graph input float ids", lambda e: flow(e, input=torch.tensor([5.0, 6.0])), "input"),
    R("flow_graph input id >= vocab", lambda e: flow(e, input=torch.tensor([5, 10**6])), "input"),
    R("flow_graph position=99", lambda e: flow(e, position=99), "position"),
    R("flow_graph position=1.0", lambda e: flow(e, position=1.0), "position"),
    R("flow_graph position=True", lambda e: flow(e, position=True), "position"),
    R("flow_graph n_heads=-2", lambda e: flow(e, n_heads=-2), "n_heads"),
    R("flow_graph n_heads=True", lambda e: flow(e, n_heads=True), "n_heads"),
    R("flow_graph n_heads=2.0", lambda e: flow(e, n_heads=2.0), "n_heads"),
    R("flow_graph n_memory='2'", lambda e: flow(e, n_memory="2"), "n_memory"),
    R("flow_graph n_top_neurons=-5", lambda e: flow(e, n_top_neurons=-5), "n_top_neurons"),
    R("flow_graph n_bottom_neurons=-1", lambda e: flow(e, n_bottom_neurons=-1), "n_bottom_neurons"),
    R("flow_graph k=0", lambda e: flow(e, k=0), "k"),
    R("flow_graph k > vocab", lambda e: flow(e, k=10**6), "k"),
    R("flow_graph backward='yes'", lambda e: flow(e, backward="yes"), "backward"),
    R("flow_graph metric on a forward graph", lambda e: flow(e, metric=lambda lg, t: lg.sum()), "metric"),
    R("flow_graph metric='x'", lambda e: flow(e, backward=True, metric="x"), "metric"),
    R("flow_graph metric -> nan", lambda e: flow(e, backward=True, metric=lambda lg, t: lg.sum() * nan),
      "metric"),
    R("flow_graph bias_nodes='no'", lambda e: flow(e, bias_nodes="no"), "bias_nodes"),
    R("flow_graph normalize='yes'", lambda e: flow(e, normalize="yes"), "normalize"),
    R("flow_graph target >= vocab", lambda e: flow(e, target=10**6), "target"),
    R("flow_graph prepend_bos='yes'", lambda e: flow(e, prepend_bos="yes"), "prepend_bos"),
    R("flow_graph like=42", lambda e: flow(e, like=42), "like"),
    R("flow_graph like= another prompt", lambda e: flow(e, like=e.graph_other), "like"),
    R("flow_graph like= another position", lambda e: flow(e, like=e.graph_pos), "like"),
    R("flow_graph like= another layer", lambda e: flow(e, layer=1, like=e.graph), "like"),
    R("flow_graph like= backward of another prompt", lambda e: flow(e, backward=True, like=e.graph_other), "like"),
    R("FlowGraph.node('nope')", lambda e: e.graph.node("nope"), "nope", KeyError),
    R("FlowGraph.nodes_of('nope')", lambda e: e.graph.nodes_of("nope"), "kind"),
    R("merge([])", lambda e: merge([]), "graphs"),
    R("merge overlapping layers", lambda e: merge([e.graph, e.graph]), "layers"),
    R("merge graphs of two prompts", lambda e: merge([e.graph_other, e.graph_l1]), "graphs"),
    R("ln_filter layer=5", lambda e: ln_filter(e.gpt2, [PROMPT], layer=5), "layer"),
    R("ln_filter layer=0.0", lambda e: ln_filter(e.gpt2, [PROMPT], layer=0.0), "layer"),
    R("ln_filter which='ln3'", lambda e: ln_filter(e.gpt2, [PROMPT], layer=0, which="ln3"), "which"),
    R("ln_filter k=0", lambda e: ln_filter(e.gpt2, [PROMPT], layer=0, k=0), "k"),
    R("ln_filter k=True", lambda e: ln_filter(e.gpt2, [PROMPT], layer=0, k=True), "k"),
    R("ln_filter prompts=[]", lambda e: ln_filter(e.gpt2, [], layer=0), "prompts"),
    R("ln_filter position=99", lambda e: ln_filter(e.gpt2, [PROMPT], layer=0, position=99), "position"),
    R("ln_filter batch_size=0", lambda e: ln_filter(e.gpt2, [PROMPT], layer=0, batch_size=0), "batch_size"),
    R("ln_filter batch_size=True", lambda e: ln_filter(e.gpt2, [PROMPT], layer=0, batch_size=True), "batch_size"),
    R("regularisation_neurons top=0", lambda e: regularisation_neurons(e.gpt2, [PROMPT], top=0), "top"),
    R("regularisation_neurons top=True", lambda e: regularisation_neurons(e.gpt2, [PROMPT], top=True), "top"),
    R("regularisation_neurons min_fraction=nan", lambda e: regularisation_neurons(e.gpt2, [PROMPT],
                                                                                  min_fraction=nan), "min_fraction"),
    R("regularisation_neurons min_fraction='x'", lambda e: regularisation_neurons(e.gpt2, [PROMPT],
                                                                                  min_fraction="x"), "min_fraction"),
    R("regularisation_neurons layers=[0, 0]", lambda e: regularisation_neurons(e.gpt2, [PROMPT], layers=[0, 0]),
      "layers"),
    R("regularisation_neurons baseline=0", lambda e: regularisation_neurons(e.gpt2, [PROMPT], baseline=0),
      "baseline"),
    R("regularisation_neurons k=0", lambda e: regularisation_neurons(e.gpt2, [PROMPT], k=0), "k"),
]

# Analyses read off one shared capture (the report's single pass).
SHARED = [
    R("flow_graph cache= lacking the flow hooks", lambda e: flow(e, cache=e.cache, target=TARGET), "cache"),
    R("flow_graph cache='x'", lambda e: flow(e, cache="x", target=TARGET), "cache"),
    R("flow_graph cache= of another prompt", lambda e: flow(e, target=TARGET, cache=tlb.capture(
        e.gpt2, "a big dog ran to the", NLL, names=flow_hook_names(e.gpt2, 0))), "cache"),
    R("flow_graph cache= and metric=", lambda e: flow(e, backward=True, cache=e.cache,
                                                     metric=lambda logits, tokens: logits.sum()), "metric"),
    R("reversed_attention_from_cache lacking hooks", lambda e: reversed_attention_from_cache(e.gpt2, e.cache), "cache"),
    R("reversed_attention_from_cache cache=42", lambda e: reversed_attention_from_cache(e.gpt2, 42), "cache"),
    R("reversed_attention_from_cache layers=9", lambda e: reversed_attention_from_cache(e.gpt2, e.cache, layers=9),
      "layer"),
    R("factors_from_cache lacking hooks", lambda e: factors_from_cache(e.gpt2, e.cache), "cache"),
    R("factors_from_cache modules='x'", lambda e: factors_from_cache(e.gpt2, e.cache, modules="x"), "modules"),
    R("lens_from_factors top_k=0", lambda e: lens_from_factors(e.gpt2, e.gf, TARGET, top_k=0), "top_k"),
    R("lens_from_factors target=None", lambda e: lens_from_factors(e.gpt2, e.gf, None), "target"),
    R("ra_hook_names layers=[0, 0]", lambda e: ra_hook_names(e.gpt2, [0, 0]), "layers"),
    R("factor_hook_names modules=3", lambda e: factor_hook_names(e.gpt2, 3), "modules"),
    R("flow_hook_names layer=-9", lambda e: flow_hook_names(e.gpt2, -9), "layer"),
]

SEGMENTS = [
    R("from_ids tokens float", lambda e: from_ids(tokens=TOKENS.float()), "tokens"),
    R("from_ids tokens complex", lambda e: from_ids(tokens=TOKENS.to(torch.complex64)), "tokens"),
    R("from_ids tokens bool", lambda e: from_ids(tokens=TOKENS.bool()), "tokens"),
    R("from_ids tokens='abc'", lambda e: from_ids(tokens="abc"), "tokens"),
    R("from_ids tokens empty batch", lambda e: from_ids(tokens=torch.zeros(0, 5, dtype=LONG),
                                                        segment_ids=torch.zeros(0, 5, dtype=LONG)), "tokens"),
    R("from_ids tokens no positions", lambda e: from_ids(tokens=torch.zeros(1, 0, dtype=LONG),
                                                         segment_ids=torch.zeros(1, 0, dtype=LONG)), "tokens"),
    R("from_ids tokens 3-D", lambda e: from_ids(tokens=TOKENS[None], segment_ids=SEG_IDS[None]), "tokens"),
    R("from_ids tokens negative", lambda e: from_ids(tokens=TOKENS - 3), "tokens"),
    R("from_ids segment_ids shape", lambda e: from_ids(segment_ids=SEG_IDS[:, :3]), "segment_ids"),
    R("from_ids segment_ids float", lambda e: from_ids(segment_ids=SEG_IDS + 0.5), "segment_ids"),
    R("from_ids segment_ids -2", lambda e: from_ids(segment_ids=torch.tensor([[0, 0, -2, -1, -1]])), "segment_ids"),
    R("from_ids segment_ids with a gap", lambda e: from_ids(segment_ids=torch.tensor([[0, 0, 2, -1, -1]])),
      "segment_ids"),
    R("from_ids segment_ids not contiguous", lambda e: from_ids(segment_ids=torch.tensor([[0, -1, 0, -1, -1]])),
      "segment_ids"),
    R("from_ids valid shape", lambda e: from_ids(valid=torch.ones(1, 3, dtype=torch.bool)), "valid"),
    R("from_ids valid float", lambda e: from_ids(valid=torch.full((1, 5), 0.5)), "valid"),
    R("from_ids target shape", lambda e: from_ids(target=torch.ones(2, 5, dtype=torch.bool)), "target"),
    R("from_ids target inside a block", lambda e: from_ids(target=torch.ones(1, 5, dtype=torch.bool)), "target"),
    R("from_spans float spans", lambda e: spans([(0.5, 2)]), "spans"),
    R("from_spans span past the end", lambda e: spans([(0, 99)]), "spans"),
    R("from_spans empty span", lambda e: spans([(2, 1)]), "spans"),
    R("from_spans overlapping", lambda e: spans([(0, 2), (1, 3)]), "spans"),
    R("from_spans spans=None", lambda e: spans(None), "spans"),
    R("from_spans spans='ab'", lambda e: spans("ab"), "spans"),
    R("from_spans wrong number of rows", lambda e: spans([[(0, 2)], [(0, 1)]]), "spans"),
    R("from_spans span of one number", lambda e: spans([(0,)]), "spans"),
    R("from_spans bool bound", lambda e: spans([(True, 2)]), "spans"),
    R("from_spans span on padding", lambda e: spans([(0, 5)], valid=torch.tensor([[1, 1, 1, 0, 0]]).bool()),
      "spans"),
    R("from_spans tokens float", lambda e: spans([(0, 2)], tokens=TOKENS.float()), "tokens"),
    R("from_blocks blocks='str'", lambda e: blocks(e, value="the cat"), "blocks"),
    R("from_blocks blocks=[]", lambda e: blocks(e, value=[]), "blocks"),
    R("from_blocks blocks=[1]", lambda e: blocks(e, value=[1]), "block"),
    R("from_blocks empty block", lambda e: blocks(e, value=("the cat", "")), "block"),
    R("from_blocks 2 answers for 1 prompt", lambda e: blocks(e, answer=["a", "b"]), "answer"),
    R("from_blocks answer=42", lambda e: blocks(e, answer=42), "answer"),
    R("from_blocks prepend_bos='yes'", lambda e: blocks(e, prepend_bos="yes"), "prepend_bos"),
    R("from_blocks padding_side='middle'", lambda e: blocks(e, padding_side="middle"), "padding_side"),
    R("from_blocks model=None", lambda e: S.from_blocks(None, ["the cat"]), "model"),
    R("from_delimiter no delimiter", lambda e: delim(e, text="the cat sat"), "text"),
    R("from_delimiter delimiter=''", lambda e: delim(e, delimiter=""), "delimiter"),
    R("from_delimiter delimiter=None", lambda e: delim(e, delimiter=None), "delimiter"),
    R("from_delimiter delimiter-only block", lambda e: delim(e, text="the ### ### cat"), "text"),
    R("from_delimiter delimiter-only first block", lambda e: delim(e, text="### the cat ### dog"), "text"),
    R("from_delimiter text=42", lambda e: delim(e, text=42), "text"),
    R("from_delimiter text=[]", lambda e: delim(e, text=[]), "text"),
    R("from_delimiter prepend_bos='yes'", lambda e: delim(e, prepend_bos="yes"), "prepend_bos"),
    R("from_delimiter answer=5", lambda e: delim(e, answer=5), "answer"),
    R("from_delimiter padding_side='x'", lambda e: delim(e, padding_side="x"), "padding_side"),
    R("from_chat messages=[]", lambda e: chat(e, []), "messages"),
    R("from_chat message without content", lambda e: chat(e, [{"role": "user"}]), "messages"),
    R("from_chat messages='hi'", lambda e: chat(e, "hi"), "messages"),
    R("from_chat content=5", lambda e: chat(e, [{"role": "user", "content": 5}]), "messages"),
    R("from_chat add_generation_prompt='yes'", lambda e: chat(e, [{"role": "user", "content": "the cat"}],
                                                               add_generation_prompt="yes"), "add_generation_prompt"),
    R("concat([])", lambda e: S.concat([]), "items"),
    R("concat([seg, 1])", lambda e: S.concat([e.seg, 1]), "items"),
    R("concat padding_side='x'", lambda e: S.concat([e.seg], padding_side="x"), "padding_side"),
    R("concat pad_id=-1", lambda e: S.concat([e.seg], pad_id=-1), "pad_id"),
    R("concat pad_id=1.5", lambda e: S.concat([e.seg], pad_id=1.5), "pad_id"),
    R("Segments.select(99)", lambda e: e.seg.select(99), "index"),
    R("Segments.append float tokens", lambda e: e.seg.append(torch.ones(2, 1)), "tokens"),
    R("Segments.append wrong batch", lambda e: e.seg.append(torch.ones(3, 1, dtype=LONG)), "tokens"),
    R("Segments.spans(row=5)", lambda e: e.seg.spans(row=5), "row"),
    R("Segments.mask(q_len=0)", lambda e: e.seg.mask(q_len=0), "q_len"),
    R("Segments.mask(q_len=999)", lambda e: e.seg.mask(q_len=999), "q_len"),
    R("Segments(float tokens)", lambda e: S.Segments(TOKENS.float(), SEG_IDS, TOKENS > 0, TOKENS < 0), "tokens"),
]

MAS = [
    R("segment_mask segments=None", lambda e: masked(e, None), "segments"),
    R("segment_mask segments='x'", lambda e: masked(e, "x"), "segments"),
    R("segment_mask model and segments swapped", lambda e: masked(e, e.gpt2, model=e.seg), "model"),
    R("segment_mask ids >= vocab", lambda e: masked(e, oov_segments()), "segments"),
    R("segment_mask longer than n_ctx", lambda e: masked(e, long_segments()), "segments"),
    R("segment_mask nested", nested_masks, "nested"),
    R("segment_mask re-entered", lambda e: reenter(tlb.segment_mask(e.gpt2, e.seg)), "segment_mask"),
    R("segment_mask forward of other tokens", lambda e: masked_forward(e, torch.tensor([[5, 6]])), "tokens"),
    R("attention_patterns mask='x'", lambda e: attention_patterns(e.gpt2, e.seg, mask="x"), "mask"),
    R("attention_patterns layers=[7]", lambda e: attention_patterns(e.gpt2, e.seg, layers=[7]), "layers"),
    R("attention_patterns segments=None", lambda e: attention_patterns(e.gpt2, None), "segments"),
    R("mas_generate max_new_tokens=0", lambda e: generate(e, max_new_tokens=0), "max_new_tokens"),
    R("mas_generate max_new_tokens=True", lambda e: generate(e, max_new_tokens=True), "max_new_tokens"),
    R("mas_generate max_new_tokens=2.0", lambda e: generate(e, max_new_tokens=2.0), "max_new_tokens"),
    R("mas_generate max_new_tokens=None", lambda e: generate(e, max_new_tokens=None), "max_new_tokens"),
    R("mas_generate past n_ctx", lambda e: generate(e, max_new_tokens=1000), "max_new_tokens"),
    R("mas_generate temperature=nan", lambda e: generate(e, temperature=nan), "temperature"),
    R("mas_generate temperature=inf", lambda e: generate(e, temperature=inf), "temperature"),
    R("mas_generate temperature='hot'", lambda e: generate(e, temperature="hot"), "temperature"),
    R("mas_generate temperature=-1", lambda e: generate(e, temperature=-1), "temperature"),
    R("mas_generate temperature=True", lambda e: generate(e, temperature=True), "temperature"),
    R("mas_generate top_k > vocab", lambda e: generate(e, temperature=1.0, top_k=10**6), "top_k"),
    R("mas_generate top_k=0", lambda e: generate(e, temperature=1.0, top_k=0), "top_k"),
    R("mas_generate top_k=True", lambda e: generate(e, temperature=1.0, top_k=True), "top_k"),
    R("mas_generate top_k=2.5", lambda e: generate(e, temperature=1.0, top_k=2.5), "top_k"),
    R("mas_generate llama top_k > vocab", lambda e: tlb.mas_generate(e.llama, e.seg, max_new_tokens=1,
                                                                     temperature=1.0, top_k=10**6), "top_k"),
    R("mas_generate eos_token_id=-5", lambda e: generate(e, eos_token_id=-5), "eos_token_id"),
    R("mas_generate eos_token_id >= vocab", lambda e: generate(e, eos_token_id=10**6), "eos_token_id"),
    R("mas_generate eos_token_id='eos'", lambda e: generate(e, eos_token_id="eos"), "eos_token_id"),
    R("mas_generate eos_token_id=1.5", lambda e: generate(e, eos_token_id=1.5), "eos_token_id"),
    R("mas_generate eos_token_id=True", lambda e: generate(e, eos_token_id=True), "eos_token_id"),
    R("mas_generate seed='x'", lambda e: generate(e, temperature=1.0, seed="x"), "seed"),
    R("mas_generate seed=1.5", lambda e: generate(e, temperature=1.0, seed=1.5), "seed"),
    R("mas_generate seed=True", lambda e: generate(e, temperature=1.0, seed=True), "seed"),
    R("mas_generate segments=None", lambda e: tlb.mas_generate(e.gpt2, None, max_new_tokens=1), "segments"),
    R("mas_generate ids >= vocab", lambda e: generate(e, segments=oov_segments()), "segments"),
    R("finetune lr=inf", lambda e: tune(e, lr=inf), "lr"),
    R("finetune lr=nan", lambda e: tune(e, lr=nan), "lr"),
    R("finetune lr=0", lambda e: tune(e, lr=0), "lr"),
    R("finetune lr='1e-3'", lambda e: tune(e, lr="1e-3"), "lr"),
    R("finetune max_grad_norm=nan", lambda e: tune(e, max_grad_norm=nan), "max_grad_norm"),
    R("finetune max_grad_norm=inf", lambda e: tune(e, max_grad_norm=inf), "max_grad_norm"),
    R("finetune max_grad_norm=0", lambda e: tune(e, max_grad_norm=0), "max_grad_norm"),
    R("finetune weight_decay=-1", lambda e: tune(e, weight_decay=-1), "weight_decay"),
    R("finetune weight_decay=nan", lambda e: tune(e, weight_decay=nan), "weight_decay"),
    R("finetune epochs=0", lambda e: tune(e, epochs=0), "epochs"),
    R("finetune epochs=True", lambda e: tune(e, epochs=True), "epochs"),
    R("finetune epochs=1.0", lambda e: tune(e, epochs=1.0), "epochs"),
    R("finetune batch_size=0", lambda e: tune(e, batch_size=0), "batch_size"),
    R("finetune batch_size=True", lambda e: tune(e, batch_size=True), "batch_size"),
    R("finetune seed='x'", lambda e: tune(e, seed="x"), "seed"),
    R("finetune lora='yes'", lambda e: tune(e, lora="yes"), "lora"),
    R("finetune dataset=[]", lambda e: tune(e, dataset=[]), "dataset"),
    R("finetune dataset='x'", lambda e: tune(e, dataset="x"), "dataset"),
    R("finetune dataset without answers", lambda e: tune(e, dataset=S.Segments(
        e.seg.tokens, e.seg.segment_ids, e.seg.valid, torch.zeros_like(e.seg.target))), "answer"),
    R("finetune mask='x'", lambda e: tune(e, mask="x"), "mask"),
    R("finetune progress='yes'", lambda e: tune(e, progress="yes"), "progress"),
    R("mas_finetune lr=inf", lambda e: tlb.mas_finetune(e.gpt2, e.seg, lr=inf, progress=False), "lr"),
    R("causal_finetune max_grad_norm=nan", lambda e: tlb.causal_finetune(e.gpt2, e.seg, max_grad_norm=nan,
                                                                         progress=False), "max_grad_norm"),
    R("answer_loss mask='x'", lambda e: answer_loss(e.gpt2, e.seg, mask="x"), "mask"),
    R("answer_loss segments=None", lambda e: answer_loss(e.gpt2, None), "segments"),
]

ROWS = FLOW + SHARED + SEGMENTS + MAS
