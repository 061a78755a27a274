"""Train an embedded model on the synthetic world and write its directory and card.

    python -m tl_backward.zoo.train --model facts-gpt2            # full run, writes zoo/models/
    python -m tl_backward.zoo.train --model facts-llama --out DIR
    python -m tl_backward.zoo.train --model facts-gpt2 --smoke --out /tmp/x   # a few steps

The corpus is a seeded stream of documents (relation statements, ICL lists, segment-QA
prompts) packed into rows of ``seq_len`` tokens, each document as ``<bos> text <eos>``; the
loss covers every real token (padding is ignored). AdamW with linear warm-up and cosine decay,
fixed seeds, one CPU thread by default (see ``--threads``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tl_backward.zoo.evaluate import evaluate, fact_recall
from tl_backward.zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID, build_tokenizer
from tl_backward.zoo.world import World

from ..errors import TLBackwardError

MODELS_DIR = Path(__file__).parent / "models"
RECALL_SAMPLE = 256  # fixed seeded sample of recall prompts, re-scored by the tests


@dataclass(frozen=True)
class TrainConfig:
    family: str
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2  # llama only
    d_mlp: int = 512
    n_ctx: int = 128
    steps: int = 2500
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 200
    weight_decay: float = 0.01
    seed: int = 0
    world_seed: int = 0
    # document mixture (probabilities of statements / ICL list / segment QA)
    p_statements: float = 0.35
    p_icl: float = 0.45  # the remaining 0.20 is segment QA
    segment_mixed: bool = False  # segment contexts with both homes and jobs (World.segment_example)


CONFIGS = {
    # The shipped facts-gpt2 weights were trained on the first corpus mix (40/45/15, mixed segment
    # contexts); kept so that this command reproduces them.
    "facts-gpt2": TrainConfig(family="gpt2", p_statements=0.40, segment_mixed=True),
    # Gated MLP with d_mlp 344 keeps the parameter count close to the GPT-2 model's.
    # 1500 steps: the shared CPU ran at ~1.5 s/step while this was trained.
    "facts-llama": TrainConfig(family="llama", n_kv_heads=2, d_mlp=344, steps=1500, warmup=150),
}


def hf_config(cfg: TrainConfig, vocab_size: int):
    from transformers import GPT2Config, LlamaConfig

    common = dict(vocab_size=vocab_size, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    if cfg.family == "gpt2":  # LayerNorm with bias, learned positions, GELU MLP, tied embeddings
        return GPT2Config(n_layer=cfg.n_layers, n_embd=cfg.d_model, n_head=cfg.n_heads, n_positions=cfg.n_ctx,
                          n_inner=cfg.d_mlp, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if cfg.family == "llama":  # RoPE, RMSNorm, GQA, gated SiLU MLP
        return LlamaConfig(num_hidden_layers=cfg.n_layers, hidden_size=cfg.d_model,
                           num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                           intermediate_size=cfg.d_mlp, max_position_embeddings=cfg.n_ctx,
                           tie_word_embeddings=False, **common)
    raise TLBackwardError(f"family must be 'gpt2' or 'llama', got {cfg.family!r}", argument="cfg")


def document(world: World, rng: random.Random, cfg: TrainConfig) -> str:
    u = rng.random()
    if u < cfg.p_statements:
        return " ".join(world.statement(rng) for _ in range(rng.randint(3, 8)))
    if u < cfg.p_statements + cfg.p_icl:
        return world.icl_document(rng)
    return world.segment_example(rng, mixed=cfg.segment_mixed).text


def batches(world: World, tokenizer, cfg: TrainConfig, rng: random.Random):
    """Endless (input_ids, labels) batches; labels are -100 at padding."""
    def ids_of(text: str) -> list[int]:
        return [BOS_ID] + tokenizer(text, add_special_tokens=False)["input_ids"] + [EOS_ID]

    carry: list[int] | None = None
    while True:
        rows = torch.full((cfg.batch_size, cfg.seq_len), PAD_ID, dtype=torch.long)
        labels = torch.full_like(rows, -100)
        for r in range(cfg.batch_size):
            row: list[int] = []
            while True:
                doc = carry if carry is not None else ids_of(document(world, rng, cfg))
                carry = None
                if len(row) + len(doc) > cfg.seq_len:
                    if not row:
                        row = doc[:cfg.seq_len]
                    else:
                        carry = doc
                    break
                row += doc
            rows[r, :len(row)] = torch.tensor(row)
            labels[r, :len(row)] = torch.tensor(row)
        yield rows, labels


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(name: str, out: Path, *, smoke: bool = False, steps: int | None = None, log_every: int = 500,
          threads: int = 1) -> dict:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    if name not in CONFIGS:
        raise TLBackwardError(f"model must be one of {sorted(CONFIGS)}, got {name!r}", argument="name")
    cfg = CONFIGS[name]
    if smoke:
        cfg = TrainConfig(**{**asdict(cfg), "steps": 3, "batch_size": 4, "warmup": 1})
    elif steps is not None:
        cfg = TrainConfig(**{**asdict(cfg), "steps": steps})
    # One intra-op thread by default: these matrices are small, and on a shared 2-core machine two
    # threads per process oversubscribe the cores and run ~6x slower (measured).
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    world = World(cfg.world_seed)
    tokenizer = build_tokenizer(world.vocabulary, name=name)
    hf_cfg = hf_config(cfg, len(tokenizer))
    hf_cfg._attn_implementation = "sdpa"  # fastest for training; TransformerLens uses eager anyway
    model = AutoModelForCausalLM.from_config(hf_cfg)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    data = batches(world, tokenizer, cfg, random.Random(f"corpus-{cfg.seed}"))
    model.train()
    t0 = time.time()
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc=f"train {name}", mininterval=5.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        input_ids, labels = next(data)
        loss = model(input_ids=input_ids, attention_mask=(input_ids != PAD_ID).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
        if log_every and step and step % log_every == 0 and not smoke:
            q = evaluate(model, tokenizer, world, quick=True)
            print(f"[step {step}] loss {sum(losses[-100:]) / 100:.3f} recall {q['fact_recall']['accuracy']} "
                  f"para {q['paraphrase_recall']['accuracy']} icl {q['icl']} seg {q['segment_qa']}", flush=True)
    train_seconds = time.time() - t0
    model.eval()
    figures = evaluate(model, tokenizer, world, quick=smoke)
    sample = fact_recall(model, tokenizer, world, limit=RECALL_SAMPLE, seed=0)
    figures["fact_recall_sample"] = {"n": sample["n"], "seed": 0, "accuracy": sample["accuracy"]}
    model.config._attn_implementation = "eager"
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _mark_bos(out / "tokenizer_config.json")
    card = {
        "name": name,
        "family": cfg.family,
        "n_params": n_params,
        "vocab_size": len(tokenizer),
        "train_config": asdict(cfg),
        "train_seconds": round(train_seconds, 1),
        "final_loss": round(sum(losses[-100:]) / len(losses[-100:]), 4),
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "torch_threads": torch.get_num_threads(),
        "smoke": smoke,
        "bos": "prepended (<bos>, id 1), as TransformerBridge.to_tokens does by default",
        "figures": figures,
    }
    (out / "card.json").write_text(json.dumps(card, indent=1))
    (out / "card.md").write_text(render_card(card))
    return card


def rescore(out: Path, *, notes: str | None = None) -> dict:
    """Re-evaluate a saved model directory with the current world/evaluation code and rewrite its
    card (training facts are kept from the existing ``card.json``)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    card = json.loads((out / "card.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    world = World(card["train_config"]["world_seed"])
    figures = evaluate(model, tokenizer, world)
    sample = fact_recall(model, tokenizer, world, limit=RECALL_SAMPLE, seed=0)
    figures["fact_recall_sample"] = {"n": sample["n"], "seed": 0, "accuracy": sample["accuracy"]}
    card["figures"] = figures
    if notes is not None:
        card["notes"] = notes
    (out / "card.json").write_text(json.dumps(card, indent=1))
    (out / "card.md").write_text(render_card(card))
    return card


def _mark_bos(path: Path) -> None:
    """Record ``add_bos_token`` explicitly (TransformerLens reads it; transformers 5 drops it), and name the
    tokenizer class ``PreTrainedTokenizerFast``: transformers 5 writes ``TokenizersBackend``, which transformers
    4.x (what TransformerLens 2.x installs) cannot load; both load the same tokenizer.json under the old name."""
    cfg = json.loads(path.read_text())
    cfg.update(add_bos_token=True, add_eos_token=False, tokenizer_class="PreTrainedTokenizerFast")
    path.write_text(json.dumps(cfg, indent=2) + "\n")


TARGETS = ("fact recall ≥ 95 %; paraphrase recall ≥ 60 %; ICL 5-shot beats 0-shot by ≥ 20 points "
           "on at least three tasks; segment-QA reported")


def render_card(card: dict) -> str:
    f, c = card["figures"], card["train_config"]
    seg_chance = "copying the value of a random person in the context would score ≈ 36 %"
    arch = ("GPT-2 (LayerNorm with bias, learned positions, GELU MLP, tied embeddings)" if card["family"] == "gpt2"
            else f"Llama (RoPE, RMSNorm, GQA {c['n_heads']} heads / {c['n_kv_heads']} kv heads, gated SiLU MLP)")
    lines = [
        f"# {card['name']}",
        "",
        f"A small {arch} trained from scratch on tl_backward's synthetic world "
        f"(`tl_backward.zoo.world.World(seed={c['world_seed']})`), shipped so every feature works offline.",
        "",
        f"- {c['n_layers']} layers, d_model {c['d_model']}, {c['n_heads']} heads, d_mlp {c['d_mlp']}, "
        f"context {c['n_ctx']}, word-level vocabulary of {card['vocab_size']} tokens; {card['n_params']:,} parameters (fp32).",
        f"- Trained {c['steps']} steps × batch {c['batch_size']} × {c['seq_len']} tokens "
        f"({card['tokens_seen']:,} tokens), AdamW lr {c['lr']} (warm-up {c['warmup']}, cosine to 10 %), "
        f"seed {c['seed']}, {card['torch_threads']} CPU threads, {card['train_seconds'] / 60:.1f} min; final loss {card['final_loss']}.",
        f"- Reproduce: `python -m tl_backward.zoo.train --model {card['name']}`.",
        f"- BOS: {card['bos']}. All words are lower case (except the ICL markers `Q`, `A`).",
        "",
        "## Measured quality (top-1, greedy)",
        "",
        f"Targets: {TARGETS}.",
        "",
        "| Measure | Value |",
        "|---|---|",
        f"| Fact recall, training templates ({f['fact_recall']['n']} prompts) | {f['fact_recall']['accuracy']} % |",
        f"| Paraphrase recall, held-out templates ({f['paraphrase_recall']['n']} prompts) | {f['paraphrase_recall']['accuracy']} % |",
        f"| Segment-QA (MAS task, causal attention; {seg_chance}) | {f['segment_qa']} % |",
        f"| Segment-QA, mixed variant (homes and jobs in one context) | {f.get('segment_qa_mixed', '—')} % |",
        f"| ICL tasks with 5-shot − 0-shot ≥ 20 points | {f['tasks_with_gain_ge_20']} |",
        "",
        "Per relation (training templates / held-out template):",
        "",
        "| Relation | Recall | Paraphrase |",
        "|---|---|---|",
    ]
    for rel, acc in f["fact_recall"]["per_relation"].items():
        lines.append(f"| {rel} | {acc} | {f['paraphrase_recall']['per_relation'].get(rel, '—')} |")
    shots = list(next(iter(f["icl"].values())).keys())
    lines += ["", "ICL accuracy (%) on held-out pairs (never seen in Q:/A: format in training), "
              "3 seeded demonstration draws per pair:", "",
              "| Task | " + " | ".join(f"{k}-shot" for k in shots) + " | 5 − 0 |",
              "|---|" + "---|" * (len(shots) + 1)]
    for task, row in f["icl"].items():
        lines.append(f"| {task} | " + " | ".join(str(row[k]) for k in shots)
                     + f" | {f['icl_gain_5_vs_0'].get(task, '—')} |")
    if card.get("notes"):
        lines += ["", "## Notes", "", card["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="facts-gpt2", choices=sorted(CONFIGS))
    p.add_argument("--out", type=Path, default=None, help="output directory (default: the packaged model dir)")
    p.add_argument("--smoke", action="store_true", help="a few steps on tiny batches (for tests)")
    p.add_argument("--steps", type=int, default=None, help="override the number of steps")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--rescore", type=Path, default=None, metavar="DIR",
                   help="only re-evaluate the model saved in DIR and rewrite its card")
    p.add_argument("--notes", default=None, help="with --rescore: text for the card's Notes section")
    args = p.parse_args(argv)
    if args.rescore is not None:
        card = rescore(args.rescore, notes=args.notes)
        print(json.dumps(card["figures"], indent=1))
        return card
    if args.smoke and args.out is None:
        p.error("--smoke needs --out (it must not overwrite the shipped model)")
    out = args.out or MODELS_DIR / args.model
    card = train(args.model, out, smoke=args.smoke, steps=args.steps, threads=args.threads)
    print(json.dumps(card["figures"], indent=1))
    return card


if __name__ == "__main__":
    main()
