"""Independent references for the MAS tests (loops, written from the rule's definition)."""

import torch


def pairwise_mask(segment_ids, valid):
    """keep[b, i, j] = (j <= i or S(i) == S(j) >= 0) and valid(j), by explicit loops."""
    batch, length = segment_ids.shape
    keep = torch.zeros(batch, 1, length, length, dtype=torch.bool)
    for b in range(batch):
        for i in range(length):
            for j in range(length):
                s_i, s_j = int(segment_ids[b, i]), int(segment_ids[b, j])
                keep[b, 0, i, j] = (j <= i or (s_i == s_j and s_i >= 0)) and bool(valid[b, j])
    return keep


def random_layout(gen, length, *, pad_side=None, n_pad=0):
    """Random contiguous blocks separated by causal runs, optional padding."""
    ids = torch.full((length,), -1, dtype=torch.long)
    real = list(range(n_pad, length)) if pad_side == "left" else list(range(length - n_pad))
    pos, k = real[0], 0
    while pos <= real[-1]:
        gap = int(torch.randint(0, 3, (1,), generator=gen))
        size = int(torch.randint(1, 5, (1,), generator=gen))
        start = pos + gap
        stop = min(start + size, real[-1] + 1)
        if start >= stop:
            break
        ids[start:stop] = k
        k += 1
        pos = stop
    valid = torch.zeros(length, dtype=torch.bool)
    valid[real] = True
    return ids, valid


def no_cache_generate(model, seg, n, run=None):
    """Greedy reference: recompute the whole sequence with the full MAS-then-causal mask each step
    (new tokens have no segment, so they attend causally). ``run(cur) -> logits`` defaults to the
    bridge under ``cur.mask()``; the HF references pass their explicit 4-D (windowed) masks."""
    if run is None:
        def run(cur):
            return model(cur.tokens, attention_mask=cur.mask(), position_ids=cur.position_ids)
    cur, out = seg, []
    for _ in range(n):
        with torch.no_grad():
            logits = run(cur)
        cols = torch.arange(cur.tokens.shape[1])
        last = torch.where(cur.valid, cols, -1).max(-1).values
        nxt = logits[torch.arange(len(cur)), last].argmax(-1)
        out.append(nxt)
        cur = cur.append(nxt[:, None])
    return torch.stack(out, 1)


def windowed_additive(keep, window):
    """Additive 0 / finfo.min mask of ``keep`` AND (j > i - window) by explicit loops (None = no window)."""
    out = torch.zeros(keep.shape)
    batch, _, q_len, k_len = keep.shape
    for b in range(batch):
        for i in range(q_len):
            for j in range(k_len):
                ok = bool(keep[b, 0, i, j]) and (window is None or j > i - window)
                out[b, 0, i, j] = 0.0 if ok else torch.finfo(torch.float32).min
    return out


def greedy_causal(model, tokens, n):
    """n greedy tokens [batch, n] by re-running the plain model on the whole prefix each step (no cache, no
    mask: ordinary causal decoding; TransformerLens 2.x's own ``generate`` needs a tokenizer)."""
    cur, new = tokens, []
    with torch.no_grad():
        for _ in range(n):
            nxt = model(cur, return_type="logits")[:, -1].argmax(-1)
            new.append(nxt)
            cur = torch.cat([cur, nxt[:, None].to(cur.device)], 1)
    return torch.stack(new, 1).cpu()
