"""MAS rendering: escaped tokens, mask/pattern figures carry the right numbers."""

import json
import re

import pytest
import torch

from tl_backward.masking import attention_patterns, segment_mask
from tl_backward.masking import segments as S
from tl_backward.masking.experiment import mas_page
from tl_backward.masking.render import mask_figure, patterns_figure, segment_tokens
from tests.tolerance import MODEL_TERMS, assert_close_fp32

XSS = "<img src=x onerror=alert(1)>"


def props(fig):
    return json.loads(fig.props_json.replace("\\u003c", "<").replace("\\u003e", ">").replace("\\u0026", "&"))


def test_segment_tokens_escapes_and_colours_blocks():
    seg = S.from_ids(torch.arange(5), torch.tensor([0, 0, 1, -1, -1]))
    fig = segment_tokens(seg, ["<bos>", XSS, "b", "c", "</script>"])
    assert XSS not in fig.html and "&lt;img src=x onerror=alert(1)&gt;" in fig.html
    assert "</script>" not in fig.html
    assert fig.html.count('title="block 0"') == 2 and fig.html.count('title="causal"') == 2


def test_mask_figure_shows_the_real_tokens_mask():
    seg = S.from_ids(torch.tensor([[7, 7, 7, 7, 0, 0]]), torch.tensor([[0, 0, -1, -1, -1, -1]]),
                     valid=torch.tensor([[True, True, True, True, False, False]]))
    fig = mask_figure(seg, ["a", "b", XSS, "d", "<pad>", "<pad>"])
    p = props(fig)
    assert p["tokens"] == ["a", "b", XSS, "d"] and p["maskUpperTri"] is False
    assert torch.equal(torch.tensor(p["attention"]), seg.mask()[0, 0, :4, :4].float())
    assert XSS not in fig.to_html()  # raw markup never reaches the page
    with pytest.raises(ValueError, match="row"):
        mask_figure(seg, ["a"], row=3)
    with pytest.raises(ValueError, match="real tokens"):
        mask_figure(seg, ["a", "b"])


def test_attention_patterns_and_page(model):
    seg = S.from_blocks(model, [["the cat sat", "where is the cat ?"], ["a", "b"]], ["A :", "red"])
    mas = attention_patterns(model, seg, layers=[0, 1])
    causal = attention_patterns(model, seg, layers=1, mask="causal")
    with torch.no_grad(), segment_mask(model, seg):
        _, cache = model.run_with_cache(seg.tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    _, plain = model.run_with_cache(seg.tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    assert torch.equal(mas[1], cache["blocks.1.attn.hook_pattern"])
    v = seg.valid[0]
    # a padding-masked run vs an unmasked one
    assert_close_fp32(causal[0, 0][:, v][:, :, v], plain["blocks.1.attn.hook_pattern"][0][:, v][:, :, v],
                      n_terms=MODEL_TERMS)
    page = mas_page(model, seg, layer=1, row=0)
    assert len(page.figures) == 4
    shown = torch.tensor(props(page.figures[2])["attention"])
    assert torch.allclose(shown, mas[1, 0][:, v][:, :, v], rtol=1e-5, atol=0)  # the page keeps 6 significant digits
    assert len(seg.render(model).figures) == 2
    fig = patterns_figure(mas[0, 0], seg.str_tokens(model, 0), title="x")
    assert props(fig)["maskUpperTri"] is False
    with pytest.raises(ValueError, match="mask"):
        attention_patterns(model, seg, mask="full")
