"""One re-entrant lock per model, so threads sharing a model take turns instead of corrupting it.

A forward + backward pass changes state that belongs to the model, not to the call: it freezes
every parameter (``requires_grad``), switches to eval mode and installs hooks on the model's hook
points; ``patch_attention``, ``zero_heads``, ``segment_mask`` and the other with-blocks of
tl_backward install hooks for as long as their block runs. Two threads doing this on one model at
the same time restore each other's flags wrongly and run on each other's hooks. So:

* :func:`tl_backward.core.stream.stream` -- and with it ``capture``, ``reversed_attention`` and
  every analysis built on them -- holds ``model_lock(model)`` for its whole forward + backward.
* Every tl_backward with-block that changes what the model computes (``patch_attention``,
  ``zero_heads``, ``segment_mask``, ``preserving_weights``) holds it from enter to exit: another
  thread's analysis of the same model waits until the block has exited (its hooks are gone, its
  weights restored) rather than running on the patched model. ``finetune`` and ``mas_generate``
  hold it while they run.
* The lock is re-entrant: in the thread that holds it, nesting works as without threads (an
  analysis inside ``patch_attention`` sees the patch). Different models never wait for each other.
* Blocks may be left in any order (e.g. ``__exit__`` called by hand), and in another thread than
  the one that entered them: each removes only its own hooks and gives back the one hold it took.
  (Why not ``threading.RLock``: it can only be released by its owner, so a block left in another
  thread would keep the model locked for good.)

Your own code can join in: ``with model_lock(model): ...`` keeps every tl_backward analysis in other
threads waiting for the block, e.g. around ``model.run_with_hooks``. Two ways to deadlock remain,
as with any lock: a thread inside a block waiting for another thread that uses the same model, and
two threads holding blocks on two models that each wait for the other's model.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Iterator

from tl_backward.errors import TLBackwardError

__all__ = ["ModelLock", "lock_of", "model_lock"]


class ModelLock:
    """A re-entrant lock whose holds are counted, not tied to the releasing thread.

    ``acquire`` waits until no other thread holds it, then adds one hold for the calling thread;
    ``release`` gives back one hold, whichever thread calls it, and wakes a waiter at zero.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._owner: int | None = None  # thread id of the holder (None = free)
        self._depth = 0
        self._waiting = 0

    def acquire(self) -> None:
        me = threading.get_ident()
        with self._changed:
            self._waiting += 1
            try:
                self._changed.wait_for(lambda: self._owner in (None, me))
            finally:
                self._waiting -= 1
            self._owner, self._depth = me, self._depth + 1

    def release(self) -> None:
        with self._changed:
            if self._depth == 0:
                raise RuntimeError("ModelLock.release() without a matching acquire()")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._changed.notify()

    @property
    def holder(self) -> int | None:
        """Thread id (``threading.get_ident()``) of the thread holding the lock, or None."""
        return self._owner

    @property
    def depth(self) -> int:
        """Number of holds not yet released (0 = free)."""
        return self._depth

    @property
    def waiting(self) -> int:
        """Number of threads blocked in :meth:`acquire`."""
        return self._waiting


_LOCKS: "weakref.WeakKeyDictionary[Any, ModelLock]" = weakref.WeakKeyDictionary()
_REGISTRY = threading.Lock()  # makes "look up or create" atomic, so a model never gets two locks


def lock_of(model: Any) -> ModelLock:
    """The model's lock, created on first use; it lives as long as the model does."""
    with _REGISTRY:
        try:
            return _LOCKS.setdefault(model, ModelLock())
        except TypeError:  # not weakly referenceable or not hashable
            raise TLBackwardError(
                f"model must be a TransformerBridge (a torch.nn.Module), got {type(model).__name__}",
                argument="model") from None


@contextlib.contextmanager
def model_lock(model: Any) -> Iterator[None]:
    """Hold ``model``'s re-entrant lock for the block (waits while another thread holds it)."""
    lock = lock_of(model)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
