"""DDP checks a hook's annotations by identity (``inspect.signature``); with ``from __future__ import annotations``
they are strings, so hooks are passed through :func:`ddp_hook` to turn them back into the objects DDP expects."""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


def ddp_hook(fn: F) -> F:
    """Resolve ``fn``'s string annotations in place (so DDP's ``register_comm_hook`` accepts it)."""
    fn.__annotations__ = typing.get_type_hints(fn)
    return fn
