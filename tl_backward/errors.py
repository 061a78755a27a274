"""The one exception type of tl_backward.

Every bad argument raises :class:`TLBackwardError`, which names the argument (``.argument``) and
says how to fix it. It subclasses both ``ValueError`` and ``TypeError`` (as numpy's ``AxisError``
subclasses ``ValueError`` and ``IndexError``), so callers that catch either keep working, and one
``except TLBackwardError`` catches everything the package raises about its inputs.
"""

from __future__ import annotations

__all__ = ["TLBackwardError"]


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
