"""load_model: local checkpoints tokenise as ``AutoTokenizer`` does (word-level, byte-level BPE in
tokenizer.json, and BPE as vocab.json + merges.txt; every family), folders that are not models fail
naming ``name``, devices and dtypes are checked, and hub names fail at once when offline."""

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tl_backward.core.compat import TransformerBridge
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import tl_backward
import tl_backward.core.loading as loading
from tl_backward.core.adapter import get_adapter
from tl_backward.errors import TLBackwardError
from tl_backward.zoo import model_dir
from tl_backward.zoo.tiny import FAMILIES, tiny_hf_model, word_tokenizer

# Unicode, leading and doubled spaces, a tab, capitals, punctuation and words no vocabulary has.
TEXTS = ("the capital of france is", " leading space", "  two  spaces\tand a tab", "unicode: café 東京 ñ ✓",
         "zzqx blorf unknownword", "Paris, France.")
CORPUS = ("the capital of france is paris", "the cat sat on the mat", "héllo wörld café 東京",
          "  spaces and\ttabs", "Rome, Italy. Berlin? yes!")
EOT = "<|endoftext|>"
KINDS = ("word", "bpe", "bpe-files")


def byte_level_bpe() -> Tokenizer:
    """A 300-token byte-level BPE trained offline on CORPUS (every byte is in its alphabet)."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(list(CORPUS) * 4, trainer)
    return core


def save_checkpoint(directory, family: str, kind: str):
    """A tiny random HF model of ``family`` and a tokenizer of ``kind``, as save_pretrained writes them."""
    directory.mkdir(parents=True)
    if kind == "word":
        tokenizer = word_tokenizer()
        tokenizer.save_pretrained(directory)
        vocab = len(tokenizer)
    else:
        core = byte_level_bpe()
        vocab = core.get_vocab_size()
        if kind == "bpe":
            PreTrainedTokenizerFast(tokenizer_object=core, bos_token=EOT, eos_token=EOT).save_pretrained(directory)
        else:  # the GPT-2 file format: no tokenizer.json, so the tokenizer class must build it
            core.model.save(str(directory))
            (directory / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT}))
    tiny_hf_model(family, vocab_size=vocab).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {(k, f): save_checkpoint(root / f"{k}-{f}", f, k) for k in KINDS for f in FAMILIES}


# ------------------------------------------------------------------------- tokenisation
def assert_tokenises_like(model, auto):
    """to_tokens, the package's tokenize and to_string agree with ``auto`` on every text, BOS explicit.

    Some texts may tokenise to nothing: for a qwen2 config, AutoTokenizer picks Qwen2Tokenizer, which
    rebuilds a byte-level BPE from a word-level vocabulary (transformers' choice; load_model follows it).
    """
    ad = get_adapter(model)
    bos = auto.bos_token_id
    assert bos is not None
    assert any(auto(text, add_special_tokens=False)["input_ids"] for text in TEXTS)
    for text in TEXTS:
        plain = auto(text, add_special_tokens=False)["input_ids"]
        assert model.to_tokens(text, prepend_bos=False)[0].tolist() == plain, text
        assert model.to_tokens(text, prepend_bos=True)[0].tolist() == [bos] + plain, text
        default = [bos] if model.cfg.default_prepend_bos else []
        assert model.to_tokens(text)[0].tolist() == default + plain, text
        if plain:
            assert ad.tokenize(text, prepend_bos=False).tokens[0].tolist() == plain, text
        else:  # the package refuses a prompt of no tokens
            with pytest.raises(ValueError, match="tokenises to nothing"):
                ad.tokenize(text, prepend_bos=False)
        assert ad.tokenize(text, prepend_bos=True).tokens[0].tolist() == [bos] + plain, text
        assert model.to_string(torch.tensor(plain)) == auto.decode(plain), text


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_local_checkpoint_tokenises_like_autotokenizer(checkpoints, kind, family):
    directory = checkpoints[kind, family]
    auto = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = tl_backward.load_model(directory)
    assert type(model.tokenizer) is type(auto)  # the class Hugging Face picks, not a forced one
    assert_tokenises_like(model, auto)
    assert model.cfg.model_name == str(directory)


@pytest.mark.parametrize("name", tl_backward.list_models())
def test_embedded_models_tokenise_like_autotokenizer(name):
    model = tl_backward.load_model(name)
    assert_tokenises_like(model, AutoTokenizer.from_pretrained(model_dir(name), local_files_only=True))


def test_word_level_unknown_words_read_as_unk(checkpoints):
    # An independent check of the word-level case: the tokenizer's own vocabulary, looked up by hand.
    directory = checkpoints["word", "gpt2"]
    vocab = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    model = tl_backward.load_model(directory)
    text = "the cat zzqx sat . Paris"
    expected = [vocab.get(w, vocab["<unk>"]) for w in text.split()]
    assert model.to_tokens(text, prepend_bos=False)[0].tolist() == expected


# ------------------------------------------------------------------------- folders that are not models
def not_models(root, checkpoints):
    """(path, words the error must contain) for folders load_model must refuse."""
    source = checkpoints["word", "gpt2"]

    def folder(name, *files):
        d = root / name
        d.mkdir()
        for f in files:
            (d / f).write_bytes((source / f).read_bytes())
        return d

    junk = folder("junk-config", "tokenizer.json", "tokenizer_config.json")
    (junk / "config.json").write_text("{not json")
    return [
        (folder("no-tokenizer", "config.json", "model.safetensors"), ["no tokenizer files", "tokenizer.json",
                                                                      "save_pretrained"]),
        (folder("no-weights", "config.json", "tokenizer.json", "tokenizer_config.json"), ["cannot be loaded",
                                                                                          "model.safetensors"]),
        (folder("empty"), ["not a Hugging Face model directory", "config.json"]),
        (folder("tokenizer-only", "tokenizer.json", "tokenizer_config.json"), ["no config.json"]),
        (junk, ["config.json", "cannot be read"]),
        (source / "config.json", ["is a file", "directory"]),
        (root / "no-such-dir", ["not an existing directory"]),
    ]


def test_folders_that_are_not_models_fail_naming_name(tmp_path, checkpoints):
    for path, words in not_models(tmp_path, checkpoints):
        with pytest.raises(TLBackwardError) as info:
            tl_backward.load_model(path)
        assert info.value.argument == "name", path
        message = str(info.value)
        assert "Traceback" not in message and repr(str(path)).strip("'") in message, message
        for word in words:
            assert word in message, (path, message)


def test_relative_and_home_paths_are_local_not_hub_names(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(TransformerBridge, "boot_transformers", _forbidden_boot)
    for name in ("./missing", "../missing", "~/no-such-tl-backward-dir", str(tmp_path / "missing")):
        with pytest.raises(TLBackwardError, match="not an existing directory") as info:
            tl_backward.load_model(name)
        assert info.value.argument == "name"


@pytest.mark.parametrize("name, words", [(42, ["name", "int"]), (["gpt2"], ["name", "list"]), ("  ", ["empty"])])
def test_bad_names(name, words):
    with pytest.raises(TLBackwardError) as info:
        tl_backward.load_model(name)
    assert info.value.argument == "name"
    for word in words:
        assert word in str(info.value)


# ------------------------------------------------------------------------- device and dtype
@pytest.mark.parametrize("device, words", [
    pytest.param("cuda", ["'cuda'", "not available", "device='cpu'"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    pytest.param(torch.device("cuda", 7), ["'cuda:7'", "not available"],
                 marks=pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has 8 GPUs")),
    ("gpu0", ["unknown device 'gpu0'", "'cuda:N'"]),
    ("", ["unknown device"]),
    ("meta", ["meta", "no weights"]),
    (3.5, ["float", "3.5", "torch.device"]),
    (True, ["bool", "torch.device"]),
    (0, ["int", "'cuda:0'"]),
])
def test_bad_devices_are_refused_before_loading(device, words, monkeypatch):
    monkeypatch.setattr(TransformerBridge, "boot_transformers", _forbidden_boot)
    with pytest.raises(TLBackwardError) as info:
        tl_backward.load_model(device=device)
    assert info.value.argument == "device"
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "cpu:0"])
def test_valid_devices_place_every_parameter(checkpoints, device):
    model = tl_backward.load_model(checkpoints["word", "llama"], device=device)
    assert torch.device(model.cfg.device).type == "cpu"
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {b.device.type for b in model.buffers()} == {"cpu"}


def test_device_map_dispatches_the_blocks(checkpoints):
    # A device map (here every module on the CPU: this machine has no second device) reaches
    # from_pretrained; the dispatched model computes what the single-device one does.
    path = checkpoints["word", "gpt2"]
    dm = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu", "transformer.h.1": "cpu",
          "transformer.ln_f": "cpu", "lm_head": "cpu"}
    split, whole = tl_backward.load_model(path, device_map=dm), tl_backward.load_model(path, device="cpu")
    assert not split.training and {p.device.type for p in split.parameters()} == {"cpu"}
    tokens = whole.to_tokens("the cat sat")
    with torch.no_grad():
        assert torch.equal(split(tokens, return_type="logits"), whole(tokens, return_type="logits"))


@pytest.mark.parametrize("kwargs, words", [
    (dict(device="cpu", device_map="auto"), ["device=", "device_map=", "not both"]),
    (dict(device_map="everywhere"), ["'auto'", "dict", "everywhere"]),
    (dict(device_map={}), ["non-empty dict"]),
    (dict(device_map={"lm_head": "gpu0"}), ["device_map['lm_head']", "unknown device 'gpu0'"]),
])
def test_bad_device_maps_are_refused_before_loading(kwargs, words):
    with pytest.raises(TLBackwardError) as info:
        tl_backward.load_model(**kwargs)
    assert info.value.argument == "device_map"
    assert all(w in str(info.value) for w in words), str(info.value)


def test_placement_guard_names_device(checkpoints, monkeypatch):
    # TransformerLens records device= without moving a pre-loaded model; the guard catches a mismatch.
    model = tl_backward.load_model(checkpoints["word", "gpt2"])
    monkeypatch.setattr(model.cfg, "device", "meta")
    with pytest.raises(TLBackwardError, match="parameter .* is on 'cpu'") as info:
        loading._check_placed(model)
    assert info.value.argument == "device"


@pytest.mark.parametrize("dtype, words", [
    (True, ["bool", "torch.float32"]), ("float16", ["str", "torch.float16"]), (torch.int64, ["torch.int64"]),
    (torch.bool, ["torch.bool"]), (torch.complex64, ["torch.complex64"]), (None, ["NoneType"]),
])
def test_bad_dtypes_are_refused(dtype, words):
    with pytest.raises(TLBackwardError) as info:
        tl_backward.load_model(dtype=dtype)
    assert info.value.argument == "dtype"
    for word in words:
        assert word in str(info.value)


def test_float64_loads_in_float64(checkpoints):
    model = tl_backward.load_model(checkpoints["word", "neox"], dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}


# ------------------------------------------------------------------------- hub names offline
def _forbidden_boot(*args, **kwargs):
    raise AssertionError("boot_transformers was called: the hub's retry loop would have run")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty HF cache, online mode, and a recorder in place of boot_transformers."""
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []
    original = TransformerBridge.boot_transformers

    def boot(name, **kwargs):
        if "hf_model" in kwargs:  # a local directory (or a cached snapshot): no hub involved
            return original(name, **kwargs)
        calls.append(name)
        raise OSError("simulated: the hub said no")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", boot)
    return calls


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_offline_error(calls, name, *words):
    start = time.perf_counter()
    with pytest.raises(TLBackwardError) as info:
        tl_backward.load_model(name)
    elapsed = time.perf_counter() - start
    assert calls == []  # boot_transformers, and with it huggingface_hub's retries, never ran
    assert elapsed < 10  # a generous regression guard against the ~25 s retry loop
    assert info.value.argument == "name"
    for word in (f"could not load model {name!r}", "not in the local Hugging Face cache", *words):
        assert word in str(info.value), str(info.value)


def test_hf_hub_offline_fails_at_once(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=1.0: pytest.fail("probed the hub while offline"))
    _assert_offline_error(hub, "gpt2", "HF_HUB_OFFLINE is set")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # set before import: the constant alone counts
    _assert_offline_error(hub, "gpt2", "HF_HUB_OFFLINE is set")


def test_unreachable_endpoint_fails_at_once(hub, monkeypatch):
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    _assert_offline_error(hub, "gpt2", "127.0.0.1", "unreachable")


def test_probe_is_bounded_when_the_connect_hangs(monkeypatch):
    # A connect that never returns (a black-holed route): the probe still answers within its timeout.
    release = threading.Event()
    def hanging_connect(*args, **kwargs):
        release.wait(60)
        raise OSError("released by the test")

    monkeypatch.setattr(loading.socket, "create_connection", hanging_connect)
    try:
        start = time.perf_counter()
        assert loading.hub_reachable(timeout=0.2) is False
        assert time.perf_counter() - start < 5
    finally:
        release.set()


def test_reachable_hub_boots_through_transformers(hub, monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        with pytest.raises(TLBackwardError, match="hub could not provide it .*simulated") as info:
            tl_backward.load_model("some-org/some-model")
    assert hub == ["some-org/some-model"]  # online, boot_transformers is the path
    assert info.value.argument == "name"


def test_cached_hub_model_loads_offline_from_the_cache(hub, monkeypatch):
    """A hub name in the local HF cache loads without the hub, through the local-directory path."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_constants.HF_HUB_CACHE + "/models--tiny-org--tiny-llama"
    snapshot = save_checkpoint(Path(repo) / "snapshots" / commit, "llama", "bpe")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tl_backward.load_model("tiny-org/tiny-llama")
    assert hub == [] and model.cfg.model_name == "tiny-org/tiny-llama"
    assert_tokenises_like(model, AutoTokenizer.from_pretrained(snapshot, local_files_only=True))
