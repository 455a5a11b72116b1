"""The one place that decides, per op, between the reference path and a fast kernel.

Four ops get fast kernels: ``mel_frontend``, ``rel_pos_attention``, ``conv_module`` and
``masked_token_loss``.  Model code never calls a kernel directly; it calls :func:`dispatch`
with the op name and the op's arguments.  The reference implementation (plain PyTorch that
mirrors SPEC.md) is registered by the module that owns it; the fast implementation lives in
``nest_fast.kernels`` (Triton) or ``nest_fast._C`` (C++/CUDA) and is imported lazily, so
``import nest_fast`` needs neither Triton nor a compiled extension.

Selecting the backend::

    nest_fast.set_backend("fast")            # or "reference", or "auto" (the default)
    NEST_FAST_BACKEND=fast python ...        # same, from the environment
    with nest_fast.use_backend("reference"): ...

* ``auto`` (default): the fast kernels for CUDA tensors, the reference path (NeMo's numbers) for CPU tensors.
* ``fast``: the fast implementation wherever it supports the arguments: CUDA, the C++ mel frontend on CPU,
  and the Triton kernels on CPU tensors when ``TRITON_INTERPRET=1`` (a correctness tool, not a speed path).
* ``reference``: plain PyTorch everywhere, bit-exact with NeMo 3.0.0 on CPU.

A fast implementation is a callable with the reference's signature plus an optional
``supports(*args, **kwargs) -> bool`` attribute.  When the backend is "fast" and the fast
implementation exists, imports, and supports the given arguments (e.g. CUDA tensors, or any
tensors when ``TRITON_INTERPRET=1``), it runs; otherwise the reference runs.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from typing import Callable, Dict, Iterator, Optional

BACKENDS = ("auto", "reference", "fast")

# op name -> "module:attribute" of its fast implementation (imported on first use)
FAST_IMPLS: Dict[str, str] = {
    "mel_frontend": "nest_fast.frontend_ext:mel_frontend_fast",
    "rel_pos_attention": "nest_fast.kernels.rel_pos_attention:rel_pos_attention_fast",
    "conv_module": "nest_fast.kernels.conv_module:conv_module_fast",
    "masked_token_loss": "nest_fast.kernels.masked_nll:masked_token_loss_fast",
}
OPS = tuple(FAST_IMPLS)

_reference: Dict[str, Callable] = {}
_fast_cache: Dict[str, Optional[Callable]] = {}
_state = threading.local()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


_default_backend = _check_name(os.environ.get("NEST_FAST_BACKEND", "auto") or "auto")


def set_backend(name: str) -> None:
    """Select "auto", "reference" or "fast" for every op, process-wide."""
    global _default_backend
    _default_backend = _check_name(name)


def get_backend() -> str:
    return getattr(_state, "override", None) or _default_backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily select a backend in this thread."""
    name = _check_name(name)
    prev = getattr(_state, "override", None)
    _state.override = name
    try:
        yield
    finally:
        _state.override = prev


def register_reference(op: str) -> Callable[[Callable], Callable]:
    if op not in FAST_IMPLS:
        raise KeyError(f"unknown op {op!r}; known ops: {OPS}")

    def deco(fn: Callable) -> Callable:
        _reference[op] = fn
        return fn

    return deco


def triton_interpret() -> bool:
    """True when Triton kernels should run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fast_impl(op: str) -> Optional[Callable]:
    """The fast implementation of ``op``, or None when it is missing or cannot be imported."""
    if op not in _fast_cache:
        target = FAST_IMPLS[op]
        mod_name, attr = target.split(":")
        try:
            fn = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError, OSError) as e:  # kernel not built / no triton
            if not isinstance(e, ModuleNotFoundError) or mod_name not in str(e):
                warnings.warn(f"nest_fast: fast {op} unavailable ({e}); using the reference path")
            fn = None
        _fast_cache[op] = fn
    return _fast_cache[op]


def reference_impl(op: str) -> Callable:
    if op not in _reference:
        # the owning module registers on import; importing the package registers all of them
        importlib.import_module("nest_fast")
    return _reference[op]


def _any_cuda(args, kwargs) -> bool:
    for a in list(args) + list(kwargs.values()):
        if getattr(a, "is_cuda", False):
            return True
    return False


def _select(op: str, args, kwargs) -> Optional[Callable]:
    name = get_backend()
    if name == "reference" or (name == "auto" and not _any_cuda(args, kwargs)):
        return None
    fn = fast_impl(op)
    if fn is None:
        return None
    supports = getattr(fn, "supports", None)
    return fn if supports is None or supports(*args, **kwargs) else None


def dispatch(op: str, *args, **kwargs):
    """Run ``op`` on the selected backend (falling back to the reference when needed)."""
    fn = _select(op, args, kwargs)
    if fn is not None:
        return fn(*args, **kwargs)
    return reference_impl(op)(*args, **kwargs)


def will_use_fast(op: str, *args, **kwargs) -> bool:
    """Whether :func:`dispatch` would run the fast implementation for these arguments."""
    return _select(op, args, kwargs) is not None
