"""torch.library helpers shared by the ops: one op's typed arguments reused by another, and the
writing twin of an allocating custom op."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch


def with_arguments(fn: Callable, like: Callable, *extra: tuple[str, type], returns) -> Callable:
    """``fn``, its signature for ``torch.library.custom_op``'s schema inference set to ``like``'s typed
    arguments, then the ``(name, type)`` pairs of ``extra``, returning ``returns``: an op that takes
    another op's arguments and more keeps them in step with it.

    Example::

        _op_vp = torch.library.custom_op(
            "lenkernels::op_vp", with_arguments(_op_vp, _op, ("group_name", str), returns=torch.Tensor),
            mutates_args=(),
        )
    """
    sig = inspect.signature(like, eval_str=True)
    params = [*sig.parameters.values()]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=t) for n, t in extra]
    fn.__signature__ = sig.replace(parameters=params, return_annotation=returns)
    return fn


def writing_twin(name: str, like: Callable, write: Callable, *, mutates: str, doc: str):
    """Registers the custom op ``name``: ``like``'s typed arguments (plus a last ``mutates: Tensor``
    where ``like`` has no argument of that name), calls ``write(*args)`` to write into ``mutates``,
    returns None; its fake does nothing. ``like`` is the undecorated function of the allocating op,
    so the two schemas cannot drift apart.

    Example::

        _op_out = writing_twin("lenkernels::op_out", _op, op_fwd, mutates="out", doc="Writes into out.")
        _op = torch.library.custom_op("lenkernels::op", _op, mutates_args=())
    """
    extra = () if mutates in inspect.signature(like).parameters else ((mutates, torch.Tensor),)

    def op(*args) -> None:
        write(*args)

    op.__name__ = op.__qualname__ = name.split("::")[-1]
    op.__doc__ = doc
    twin = torch.library.custom_op(name, with_arguments(op, like, *extra, returns=None), mutates_args=(mutates,))
    twin.register_fake(lambda *args: None)
    return twin
