"""The one exception type of tl_backward.

Every bad argument raises :class:`TLBackwardError`, which names the argument (``.argument``) and
says how to fix it. It subclasses both ``ValueError`` and ``TypeError`` (as numpy's ``AxisError``
subclasses ``ValueError`` and ``IndexError``), so callers that catch either keep working, and one
``except TLBackwardError`` catches everything the package raises about its inputs.
:class:`BridgeUnavailable` is the one subclass: a feature that needs a ``TransformerBridge`` on a
TransformerLens (2.x) that has none.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["BridgeUnavailable", "TLBackwardError"]


class TLBackwardError(ValueError, TypeError):
    """A bad argument (or an unsupported model/feature combination), with the fix in the message.

    Attributes:
        argument: the name of the offending argument as the caller spells it (``"layers"``,
            ``"eta"``, ``"input"``, …), or ``None`` when the problem is the model itself.
    """

    def __init__(self, message: str, *, argument: str | None = None):
        super().__init__(message)
        self.argument = argument

    def __reduce__(self):  # picklable across processes (torch.distributed, multiprocessing)
        return (_rebuild, (str(self), self.argument))


def _rebuild(message: str, argument: str | None) -> TLBackwardError:
    return TLBackwardError(message, argument=argument)


class BridgeUnavailable(TLBackwardError):
    """``what`` needs a ``TransformerBridge``, and the installed TransformerLens (2.x) has no
    ``transformer_lens.model_bridge``; the message names both fixes."""

    def __init__(self, what: str, *, argument: str | None = None):
        try:
            installed = version("transformer_lens")
        except PackageNotFoundError:
            installed = "unknown"
        super().__init__(f"{what} needs a TransformerBridge, which TransformerLens {installed} does not have (no "
                         "transformer_lens.model_bridge): pip install 'transformer_lens>=3.9', or use a "
                         "HookedTransformer (tl_backward.load_model(..., backend='hooked'))", argument=argument)
        self.what = what

    def __reduce__(self):
        return (_rebuild_bridge, (self.what, self.argument))


def _rebuild_bridge(what: str, argument: str | None) -> BridgeUnavailable:
    return BridgeUnavailable(what, argument=argument)
