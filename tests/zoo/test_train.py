"""The training entry point: a --smoke run writes a loadable model directory with its card."""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from tl_backward.zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID, build_tokenizer
from tl_backward.zoo.train import CONFIGS, batches, lr_at, main
from tl_backward.zoo.world import World


def test_batches_pack_documents_with_bos_and_mask_padding():
    world = World(0)
    tok = build_tokenizer(world.vocabulary)
    cfg = CONFIGS["facts-gpt2"]
    ids, labels = next(batches(world, tok, cfg, random.Random(0)))
    assert ids.shape == (cfg.batch_size, cfg.seq_len)
    assert (ids[:, 0] == BOS_ID).all()
    assert ((labels == -100) == (ids == PAD_ID)).all()
    assert (ids == EOS_ID).sum() >= cfg.batch_size  # at least one whole document per row
    assert not (ids == tok.unk_token_id).any()
    again, _ = next(batches(world, tok, cfg, random.Random(0)))
    assert torch.equal(ids, again)


def test_lr_schedule_warms_up_and_decays():
    cfg = CONFIGS["facts-gpt2"]
    lrs = [lr_at(s, cfg) for s in range(cfg.steps)]
    assert lrs[0] < lrs[cfg.warmup - 1] == pytest.approx(cfg.lr)
    # the last step is one short of the schedule's end, where lr = 0.1·peak exactly
    assert lrs[-1] == pytest.approx(0.1 * cfg.lr, rel=1e-3) and min(lrs[cfg.warmup:]) >= 0.1 * cfg.lr - 1e-12


def test_smoke_training_writes_a_loadable_model(tmp_path):
    threads = torch.get_num_threads()
    card = main(["--model", "facts-gpt2", "--smoke", "--out", str(tmp_path)])
    torch.set_num_threads(threads)
    assert card["smoke"] and card["train_config"]["steps"] == 3
    on_disk = json.loads((tmp_path / "card.json").read_text())
    assert on_disk["figures"]["fact_recall"]["n"] == 200
    assert "# facts-gpt2" in (tmp_path / "card.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert model.config.vocab_size == len(tok) == len(World(0).vocabulary) + 4


def test_smoke_refuses_to_overwrite_shipped_model():
    with pytest.raises(SystemExit):
        main(["--model", "facts-gpt2", "--smoke"])
