"""Registering qpass's CPU kernels as ``torch.ops.qpass.*`` operators.

``torch.library.custom_op`` wraps every call in an autograd-aware Python layer that costs about
45 us per call on these machines, as much as an FBGEMM decode GEMM of a 576 x 576 weight. The
kernels here are inference-only, so they are registered one level lower: a schema, a CPU kernel
and a fake (meta) implementation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_LIB = torch.library.Library("qpass", "FRAGMENT")


def cpu_op(name: str, schema: str, *, fake: Callable, tags: tuple = (), keys: tuple[str, ...] = ("CPU",)) -> Callable:
    """Decorator: define ``qpass::<name><schema>`` with the decorated function as its kernel for the
    dispatch ``keys`` (add ``"MkldnnCPU"`` when an argument is a oneDNN-packed tensor) and ``fake`` as
    its fake implementation; returns the operator (``torch.ops.qpass.<name>.default``)."""

    def register(fn: Callable) -> torch._ops.OpOverload:
        _LIB.define(f"{name}{schema}", tags=tags)
        for key in keys:
            _LIB.impl(name, fn, key)
        torch.library.register_fake(f"qpass::{name}", fake, lib=_LIB)
        op = getattr(torch.ops.qpass, name).default
        op.__doc__ = fn.__doc__
        return op

    return register
