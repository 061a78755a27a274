"""Loading models: the embedded offline models, local HF directories, or hub names.

What :func:`load_model` promises:

- **Tokenizer.** A directory's tokenizer is ``AutoTokenizer.from_pretrained(directory)``, the class
  Hugging Face itself picks. TransformerLens then re-loads it through the same ``AutoTokenizer``
  with ``add_bos_token=True`` (``transformer_lens/utilities/tokenize_utils.py``,
  ``get_tokenizer_with_bos``), which changes only whether BOS is added. So
  ``model.to_tokens(text, prepend_bos=False)`` equals
  ``AutoTokenizer.from_pretrained(directory)(text, add_special_tokens=False).input_ids``, and
  ``prepend_bos=True`` puts ``bos_token_id`` in front once (TransformerLens uses the EOS token as
  BOS when a tokenizer has none). Called without ``prepend_bos``, ``to_tokens`` follows
  TransformerLens's per-family ``cfg.default_prepend_bos``: True for GPT-2 and Llama, False for
  GPT-NeoX and Qwen2. (For some model types AutoTokenizer prefers the family's own class, e.g.
  ``Qwen2Tokenizer`` for qwen2, which rebuilds a byte-level BPE from the vocabulary even when
  tokenizer.json holds a word-level model; load_model follows AutoTokenizer there too.)
- **Device.** The model's parameters really are on ``device``. A device this machine does not
  have is refused up front; left at None, TransformerLens picks one (``get_device``: CUDA if
  available, else CPU). With ``device_map`` the blocks sit where the map puts them (Hugging Face
  dispatches them; TransformerLens sets ``cfg.device`` to the embedding's device and
  ``cfg.n_devices``); that placement is not checked against one device.
- **Hub names offline.** If ``HF_HUB_OFFLINE`` is set, or the hub's host (from
  ``huggingface_hub.constants.ENDPOINT``) refuses a short TCP connect, the model comes from the
  local HF cache, or the call fails at once naming ``name``. It does not sit through
  huggingface_hub's retry loop. Online, ``TransformerBridge.boot_transformers(name)`` loads it.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import torch

from .. import zoo
from ..errors import TLBackwardError
from . import checks
from .compat import HookedTransformer, TransformerBridge, get_device, require_bridge
from .device import declared_device
from .hooked_loading import hooked_from_hf, require_hooked

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# One TCP connect to the hub host: a reachable hub answers in tens of ms, and waiting longer
# only delays the offline error that would follow anyway.
PROBE_TIMEOUT_S = 1.0
# The files a saved tokenizer consists of (any one of them): named when a directory has none.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                    "vocab.txt")
_LOCAL_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")


def load_model(name: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
               dtype: torch.dtype = torch.float32, device_map: str | dict[str, Any] | None = None,
               backend: str = "bridge") -> Any:
    """Boot a ``TransformerBridge`` (or, ``backend="hooked"``, a ``HookedTransformer``) in eval mode, raw
    (no weight processing).

    ``name``: None for the embedded default model (offline), an embedded model's name (see
    :func:`list_models`), a local directory saved with ``save_pretrained`` (model and tokenizer),
    or a Hugging Face hub name such as ``"gpt2"`` (from the local HF cache when offline).
    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a ``torch.device``; None lets
    TransformerLens choose. ``dtype``: torch.float32 (default), float16, bfloat16 or float64.
    ``device_map`` (instead of ``device``): a Hugging Face device map -- ``"auto"``, ``"balanced"`` or a
    dict ``{module name: device}`` such as ``{"transformer.h.0": "cuda:0", ..., "lm_head": "cuda:1"}``
    -- that dispatches the model's blocks over several devices (Accelerate moves each block's inputs to
    its device; tl_backward's rules for such models are in :mod:`tl_backward.core.device`).
    Tokenisation, device and offline behaviour are described in this module's docstring.
    ``backend``: ``"bridge"`` (default), or ``"hooked"`` on TransformerLens < 4: directories (the
    embedded models too) are converted by :func:`tl_backward.core.hooked_loading.hooked_from_hf` (GPT-2
    and Llama layouts), hub names load with ``HookedTransformer.from_pretrained_no_processing``.
    """
    _check_name(name)
    _check_dtype(dtype)
    device = _check_device(device)
    place = _Placement(device, _check_device_map(device_map, device))
    _check_backend(backend, place)
    boot_directory, boot_hub = _BACKENDS[backend]
    embedded = _embedded_dir(None if name is None else str(name))
    if embedded is not None:
        model = boot_directory(embedded, embedded.name, place, dtype)
    elif _looks_local(name):
        model = boot_directory(_local_dir(name), str(name), place, dtype)
    else:
        snapshot = _offline_snapshot(str(name))
        if snapshot is not None:
            model = boot_directory(snapshot, str(name), place, dtype)
        else:
            model = boot_hub(str(name), place, dtype)
    if place.device_map is None:  # a dispatched model's blocks sit where its map says, on purpose
        _check_placed(model)
    return model.eval()


def list_models() -> list[str]:
    """Names of the models shipped inside the package (usable offline)."""
    return list(zoo.list_models())


# ------------------------------------------------------------------------------- arguments
def _check_name(name: Any) -> None:
    if name is None or isinstance(name, os.PathLike):
        return
    if not isinstance(name, str):
        raise TLBackwardError(f"name must be a model name, a directory or None, got {type(name).__name__}; "
                              f"embedded models: {list_models()}", argument="name")
    if not name.strip():
        raise TLBackwardError("name is empty: pass None for the embedded default model, an embedded "
                              f"model {list_models()}, a directory or a hub name such as 'gpt2'",
                              argument="name")


def _check_dtype(dtype: Any) -> None:
    if not isinstance(dtype, torch.dtype) or dtype not in DTYPES:
        shown = dtype if isinstance(dtype, torch.dtype) else f"{type(dtype).__name__} {dtype!r}"
        raise TLBackwardError(f"dtype must be one of {', '.join(map(str, DTYPES))}, got {shown}",
                              argument="dtype")


def _check_device(device: Any) -> torch.device | None:
    """``device`` as a torch.device that this machine has (None stays None)."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise TLBackwardError(f"device must be a string such as 'cpu' or 'cuda:0', or a torch.device, "
                              f"got {type(device).__name__} {device!r}", argument="device")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise TLBackwardError(f"unknown device {device!r}: pass 'cpu', 'cuda', 'cuda:N' or 'mps'",
                              argument="device") from None
    if dev.type == "meta":
        raise TLBackwardError("device 'meta' holds no weights: pass 'cpu' or 'cuda'", argument="device")
    try:
        # The one test every backend answers truthfully; it also names the device tensors land on
        # ("cpu:0" -> cpu, "cuda" -> cuda:0).
        return torch.empty(0, device=dev).device
    except (RuntimeError, AssertionError, NotImplementedError, ValueError) as err:
        raise TLBackwardError(f"device {str(dev)!r} is not available on this machine ({_first_line(err)}); "
                              "pass device='cpu'", argument="device") from None


class _Placement(NamedTuple):
    """Where :func:`load_model` puts the weights: one ``device`` or a Hugging Face ``device_map``."""

    device: torch.device | None
    device_map: str | dict[str, Any] | None = None


def _check_device_map(device_map: Any, device: torch.device | None) -> str | dict[str, Any] | None:
    """``device_map`` as Hugging Face takes it (None stays None); refused next to ``device``."""
    if device_map is None:
        return None
    if device is not None:
        raise TLBackwardError("pass device= (one device) or device_map= (blocks over several devices), not both",
                              argument="device_map")
    if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return device_map
    if isinstance(device_map, dict) and device_map and all(isinstance(k, str) for k in device_map):
        return {k: _map_value(k, v) for k, v in device_map.items()}
    raise TLBackwardError(f"device_map must be 'auto', 'balanced', 'balanced_low_0', 'sequential' or a non-empty "
                          f"dict {{module name: device}}, got {device_map!r:.60}", argument="device_map")


def _map_value(module: str, device: Any) -> int | str:
    """One ``device_map`` entry: a CUDA index or a device this machine has (as :func:`_check_device`)."""
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    try:
        return str(_check_device(device))
    except TLBackwardError as err:
        raise TLBackwardError(f"device_map[{module!r}]: {err}", argument="device_map") from None


def _check_backend(backend: Any, place: _Placement) -> None:
    """``backend`` is ``"bridge"`` or ``"hooked"``; ``"hooked"`` needs TransformerLens < 4 and one device (a
    HookedTransformer is not dispatched by a Hugging Face device map). ``"bridge"`` needs TransformerLens
    >= 3.9, refused by the boot functions once ``name`` has been checked (so a bad name is named first)."""
    checks.one_of(backend, "backend", tuple(_BACKENDS))
    if backend != "hooked":
        return
    require_hooked()
    if place.device_map is not None:
        raise TLBackwardError("backend='hooked' places the model on one device: pass device= instead of device_map=, "
                              "or use backend='bridge' for a Hugging Face device map", argument="device_map")


def _check_placed(model: Any) -> None:
    """Every parameter sits on ``cfg.device`` (TransformerLens records a device it may not apply)."""
    want = declared_device(model)
    for pname, param in model.named_parameters():
        dev = param.device
        if dev.type != want.type or None not in (want.index, dev.index) and dev.index != want.index:
            raise TLBackwardError(f"the model says device {str(want)!r} but parameter {pname} is on {str(dev)!r}; "
                                  "pass device explicitly", argument="device")


# ------------------------------------------------------------------------------- local directories
def _embedded_dir(name: str | None) -> Path | None:
    if name is None:
        if zoo.DEFAULT_MODEL not in list_models():
            raise TLBackwardError("no embedded model is shipped in this install: pass name, a local "
                                  "directory or a hub name such as 'gpt2'", argument="name")
        name = zoo.DEFAULT_MODEL
    return Path(zoo.model_dir(name)) if name in list_models() else None


def _looks_local(name: str | os.PathLike) -> bool:
    """A path, not a hub id: a PathLike, an existing file or folder, or an absolute/relative/home path."""
    text = os.fspath(name)
    return isinstance(name, os.PathLike) or os.path.exists(text) or text.startswith(_LOCAL_PREFIXES)


def _local_dir(name: str | os.PathLike) -> Path:
    path = Path(os.fspath(name)).expanduser()
    if path.is_file():
        raise TLBackwardError(f"name {str(name)!r} is a file: pass the directory that holds config.json, "
                              "the weights and the tokenizer (written by save_pretrained)", argument="name")
    if not path.is_dir():
        raise TLBackwardError(f"name {str(name)!r} is not an existing directory (nor an embedded model "
                              f"{list_models()}): check the path", argument="name")
    return path


def _boot_directory(directory: Path, label: str, place: _Placement, dtype: torch.dtype) -> Any:
    """HF model + AutoTokenizer from ``directory``, moved to ``place.device`` or dispatched by
    ``place.device_map``, wrapped as a bridge."""
    config = _read_config(directory, label)
    tokenizer = _read_tokenizer(directory, label)
    hf = _read_weights(directory, label, config, dtype, place.device_map)
    where: dict[str, str] = {}
    if place.device_map is None:
        # boot_transformers records device= but leaves a pre-loaded model where it is, so move it here.
        device = place.device if place.device is not None else torch.device(get_device())
        hf, where = hf.to(device), {"device": str(device)}
    # else: TransformerLens reads cfg.device / cfg.n_devices off the model's hf_device_map.
    require_bridge("load_model(backend='bridge')", argument="backend")
    try:
        bridge = TransformerBridge.boot_transformers(label, hf_model=hf, tokenizer=tokenizer, dtype=dtype, **where)
    except ValueError as err:  # e.g. an architecture TransformerLens has no adapter for
        raise TLBackwardError(f"name {label!r}: TransformerLens cannot bridge this model ({_first_line(err)})",
                              argument="name") from err
    return bridge


def _hooked_directory(directory: Path, label: str, place: _Placement, dtype: torch.dtype) -> Any:
    """HF model + AutoTokenizer from ``directory`` converted into a raw HookedTransformer on ``place.device``."""
    config = _read_config(directory, label)
    tokenizer = _read_tokenizer(directory, label)
    hf = _read_weights(directory, label, config, dtype)
    device = place.device if place.device is not None else torch.device(get_device())
    return hooked_from_hf(hf, tokenizer, label, device, dtype)


def _read_config(directory: Path, label: str) -> Any:
    from transformers import AutoConfig

    if not (directory / "config.json").is_file():
        raise TLBackwardError(f"name {label!r}: {directory} is not a Hugging Face model directory (no config.json); "
                              "save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)",
                              argument="name")
    try:
        return AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise TLBackwardError(f"name {label!r}: the config.json in {directory} cannot be read ({_first_line(err)})",
                              argument="name") from err


def _read_tokenizer(directory: Path, label: str) -> Any:
    """``AutoTokenizer.from_pretrained(directory)``, refusing a directory without vocabulary files
    (transformers 5 would otherwise build an empty tokenizer from the config's class; 4.x raises)."""
    from transformers import AutoTokenizer

    advice = "save it next to the model with tokenizer.save_pretrained(dir)"
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        if not any((directory / f).is_file() for f in _TOKENIZER_FILES):
            raise TLBackwardError(f"name {label!r}: {directory} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}"
                                  f"); {advice}", argument="name") from err
        raise TLBackwardError(f"name {label!r}: the tokenizer in {directory} cannot be loaded "
                              f"({_first_line(err)}); {advice}", argument="name") from err
    files = {"tokenizer.json", *getattr(tokenizer, "vocab_files_names", {}).values()}
    if not any((directory / f).is_file() for f in files):
        raise TLBackwardError(f"name {label!r}: {directory} has no tokenizer files ({', '.join(sorted(files))}); "
                              f"{advice}", argument="name")
    return tokenizer


def _read_weights(directory: Path, label: str, config: Any, dtype: torch.dtype,
                  device_map: str | dict[str, Any] | None = None) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor loading bar is noise for a 1 MB model
    try:
        return AutoModelForCausalLM.from_pretrained(directory, config=config, local_files_only=True, dtype=dtype,
                                                    attn_implementation="eager", device_map=device_map)
    except (OSError, ValueError) as err:  # no weights file, or no causal-LM class for this config
        raise TLBackwardError(f"name {label!r}: the model in {directory} cannot be loaded ({_first_line(err)})",
                              argument="name") from err
    finally:
        if bar:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------- the hub
def _boot_hub(name: str, place: _Placement, dtype: torch.dtype) -> Any:
    where = {"device_map": place.device_map} if place.device_map is not None else \
        {"device": None if place.device is None else str(place.device)}
    require_bridge("load_model(backend='bridge')", argument="backend")
    try:
        return TransformerBridge.boot_transformers(name, dtype=dtype, **where)
    except (OSError, ValueError) as err:
        # Hub failures surface as OSError/ValueError deep inside transformers; say what was tried.
        raise TLBackwardError(
            f"could not load model {name!r}: it is not an embedded model {list_models()}, not a local directory, "
            f"and the Hugging Face hub could not provide it ({type(err).__name__}: {_first_line(err)})",
            argument="name") from err


def _hooked_hub(name: str, place: _Placement, dtype: torch.dtype) -> Any:
    device = None if place.device is None else str(place.device)
    try:
        return HookedTransformer.from_pretrained_no_processing(name, device=device, dtype=dtype)
    except (OSError, ValueError) as err:
        raise TLBackwardError(f"could not load model {name!r} as a HookedTransformer ({type(err).__name__}: "
                              f"{_first_line(err)})", argument="name") from err


# backend -> (boot a local directory, boot a hub name)
_BACKENDS = {"bridge": (_boot_directory, _boot_hub), "hooked": (_hooked_directory, _hooked_hub)}


def _offline_snapshot(name: str) -> Path | None:
    """The cached snapshot of ``name`` when the hub cannot be asked; None when it can (online).

    Offline (``HF_HUB_OFFLINE``) or unreachable: the cache, or a TLBackwardError naming ``name``.
    """
    offline = hub_offline()
    if not offline and hub_reachable():
        return None
    snapshot = _cached_snapshot(name)
    if snapshot is not None:
        return snapshot
    why = ("HF_HUB_OFFLINE is set, so the hub was not asked" if offline
           else f"the Hugging Face hub at {_hub_address()[0]} is unreachable: offline?")
    raise TLBackwardError(
        f"could not load model {name!r}: it is not an embedded model ({', '.join(list_models()) or 'none shipped'}), "
        f"not a local directory, and not in the local Hugging Face cache ({why}). Pass an embedded model, "
        "a directory written by save_pretrained, or download it once online", argument="name")


def hub_offline() -> bool:
    """Whether huggingface_hub is in offline mode (its constant, or the variables set since import)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    # huggingface_hub < 1 (what TransformerLens 2.17+ installs) has the constant but not is_offline_mode().
    is_offline_mode = getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)
    return bool(is_offline_mode()) or any(
        (f or "").strip().lower() in ("1", "on", "yes", "true") for f in flags)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connect to the hub endpoint's host, bounded by ``timeout`` seconds in total.

    Runs in a daemon thread because name resolution ignores socket timeouts.
    """
    host, port = _hub_address()
    ok: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    probe = threading.Thread(target=connect, name="tl_backward-hub-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(ok)


def _hub_address() -> tuple[str, int]:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    return url.hostname or constants.ENDPOINT, url.port or (80 if url.scheme == "http" else 443)


def _cached_snapshot(name: str) -> Path | None:
    """The local HF cache's snapshot folder of ``name`` (no network), or None."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), or not a valid repo id
        return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
