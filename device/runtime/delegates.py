"""Accelerator delegates: which to try, in what order, and with which model file.

``delegate = auto`` tries the Edge TPU (only with a variant compiled for it), then the GPU delegate (only on a
board with a GPU: :func:`board_has_gpu`), then the CPU (where the interpreter applies XNNPACK by default). Under
``auto`` a delegate that fails to load never stops the agent: the failure becomes a warning whose reason is
kept, and status, bench and diag show it. A board without a GPU is not a failure: that the GPU delegate is not
tried there is a note (the runtime logs it at info), not a warning and an event at every start. A model
compiled for the Edge TPU is never loaded without one; its CPU variant is loaded instead.

An explicitly requested delegate (``edgetpu`` or ``gpu``) is a promise the operator relies on, so it never
falls back silently: when it cannot be used (its library is missing, the variant is not compiled for it, the
model does not run with it) loading fails with :class:`DelegateUnavailable` and the loader's reason, unless
``fallback`` (the ``runtime.delegate_fallback`` setting) allows running on the CPU instead.

Planning (:func:`plan`) is pure and runs in the supervisor; opening (:func:`open_model`) loads the
delegate libraries and the interpreter, so it runs where inference runs: in the worker process.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

from device.runtime.backends import Backend
from device.runtime.errors import DelegateUnavailable, ModelInvalid
from device.runtime.manifest import ModelManifest
from device.runtime.model import Model, check_model_file

DELEGATE_CHOICES = ("auto", "cpu", "edgetpu", "gpu")
EDGETPU_LIBRARY = "libedgetpu.so.1"
GPU_LIBRARIES = ("libtensorflowlite_gpu_delegate.so",)


def board_has_gpu(root: str | None = None) -> bool:
    """Whether this board exposes a GPU the GPU delegate could use: a Jetson's GPU device node (the nodes
    :mod:`drivers.accel` looks for), under the sysfs root (``FIELDNODE_SYSFS_ROOT``, else ``/``)."""
    from drivers.accel import JETSON_GPU_NODES
    from drivers.sysfs import resolve_root

    base = root if root is not None else resolve_root()
    return any(os.path.exists(os.path.join(base, rel)) for rel in JETSON_GPU_NODES)


class DelegateFallback(RuntimeWarning):
    """A delegate could not be used and inference fell back to the next choice."""


@dataclass(frozen=True)
class Candidate:
    """One way to run a variant: a delegate kind and the file to load with it."""

    delegate: str  # "edgetpu", "gpu" or "cpu"
    variant: str
    path: str


def resolve_variant(manifest: ModelManifest, requested: str, delegate: str) -> str:
    """Turns ``requested`` (a variant name or ``auto``) into a variant name.

    ``auto`` picks the model's Edge TPU variant when the delegate setting allows the Edge TPU, and the
    manifest's default variant otherwise.
    """
    if requested != "auto":
        manifest.variant(requested)  # raises ModelInvalid naming the variants there are
        return requested
    if delegate in ("auto", "edgetpu"):
        for v in manifest.variants.values():
            if v.requires == "edgetpu":
                return v.name
    return manifest.default_variant


def plan(manifest: ModelManifest, variant: str, delegate: str,
         fallback: bool = True, gpu: bool | None = None) -> tuple[list[Candidate], list[str]]:
    """Lists the (delegate, file) candidates to try in order for ``variant``, and notes on choices made.

    Args:
        manifest: the model.
        variant: a variant name (not ``auto``).
        delegate: ``auto``, ``cpu``, ``edgetpu`` or ``gpu``.
        fallback: whether an explicit ``edgetpu`` or ``gpu`` may fall back to the CPU.
        gpu: whether the board has a GPU (None: :func:`board_has_gpu`); under ``auto`` the GPU delegate is only
            tried on a board that has one. An explicit ``gpu`` is always tried.

    Returns:
        The candidates, and human-readable notes. The last candidate is on the CPU, except for an explicit
        delegate that may not fall back: then every candidate uses that delegate.

    Raises:
        DelegateUnavailable: ``delegate`` is ``edgetpu``, falling back is not allowed, and the variant is not
            compiled for the Edge TPU.
    """
    if delegate not in DELEGATE_CHOICES:
        raise ValueError(f"delegate must be one of {', '.join(DELEGATE_CHOICES)}, got {delegate!r}")
    strict = delegate in ("edgetpu", "gpu") and not fallback
    v = manifest.variant(variant)
    notes: list[str] = []
    out: list[Candidate] = []
    if v.requires == "edgetpu":
        cpu = manifest.cpu_fallback(v.name)
        if delegate in ("auto", "edgetpu"):
            out.append(Candidate("edgetpu", v.name, v.path))
        else:
            notes.append(f"variant {v.name!r} is compiled for the Edge TPU and delegate={delegate!r}; "
                         f"running its CPU variant {cpu.name!r}")
        v = cpu
    elif delegate == "edgetpu":
        if strict:
            raise DelegateUnavailable(f"delegate 'edgetpu' was requested, but variant {v.name!r} of model "
                                      f"{manifest.name!r} is not compiled for the Edge TPU{_NO_FALLBACK}")
        notes.append(f"variant {v.name!r} is not compiled for the Edge TPU; running it on the CPU")
    if delegate == "gpu":
        out.append(Candidate("gpu", v.name, v.path))
    elif delegate == "auto":
        if gpu if gpu is not None else board_has_gpu():
            out.append(Candidate("gpu", v.name, v.path))
        else:
            notes.append("no GPU on this board: the GPU delegate is not tried")
    if not strict:
        out.append(Candidate("cpu", v.name, v.path))
    return out, notes


_NO_FALLBACK = " (runtime.delegate_fallback = true would run it on the CPU instead)"


@dataclass
class Opened:
    """The result of :func:`open_model`."""

    model: Model
    candidate: Candidate
    delegate_name: str  # what actually runs: "edgetpu", "gpu", "xnnpack" or "cpu"
    fallbacks: list  # reasons, one per candidate that could not be used


def open_model(backend: Backend, candidates: Sequence[Candidate], threads: int, warmup_runs: int,
               edgetpu_device: str = "", gpu_library: str = "",
               on_try: Callable[[Candidate], None] | None = None) -> Opened:
    """Loads the first candidate that works, falling back with a warning for each that does not.

    Args:
        on_try: called with each candidate just before its file is opened (the worker reports it, so a crash
            while loading is blamed on the right file).

    Raises:
        ModelInvalid: the CPU candidate's file itself is not a usable model.
        DelegateUnavailable: no CPU candidate follows (an explicit delegate that may not fall back), and the
            delegate could not be used; the message carries the reason.
    """
    fallbacks: list[str] = []
    for i, cand in enumerate(candidates):
        last = i == len(candidates) - 1
        delegates = []
        if cand.delegate == "edgetpu":
            options = {"device": edgetpu_device} if edgetpu_device else {}
            d, why = _load(backend, (EDGETPU_LIBRARY,), options)
            if d is None:
                fallbacks.append(_fallback("edgetpu", why, warn=not last))
                continue
            delegates.append(d)
        elif cand.delegate == "gpu":
            d, why = _load(backend, (gpu_library,) if gpu_library else GPU_LIBRARIES, {})
            if d is None:
                fallbacks.append(_fallback("gpu", why, warn=not last))
                continue
            delegates.append(d)
        if on_try is not None:
            on_try(cand)
        try:
            model = Model(cand.path, backend, threads=threads, delegates=delegates, warmup_runs=warmup_runs)
        except ModelInvalid as exc:
            if cand.delegate == "cpu":
                raise
            if last:
                check_model_file(cand.path)  # a bad file is the model's fault, whatever the delegate
            fallbacks.append(_fallback(cand.delegate, f"the model did not run with it: {exc}", warn=not last))
            continue
        name = cand.delegate
        if name == "cpu" and model.delegated:
            name = "xnnpack"
        return Opened(model, cand, name, fallbacks)
    if fallbacks:
        kind = candidates[-1].delegate
        raise DelegateUnavailable(f"delegate {kind!r} was requested and cannot be used: "
                                  f"{'; '.join(fallbacks)}{_NO_FALLBACK}")
    raise ModelInvalid("no candidate to load (the plan must end with a CPU candidate)")


def _load(backend: Backend, libraries: Sequence[str], options: dict):
    why = ""
    for lib in libraries:
        try:
            # Open the library ourselves first: a missing one then costs nothing, and the backend's Delegate
            # (whose destructor trips over a half-built object) is only made for a library that exists.
            ctypes.CDLL(lib)
        except OSError as exc:
            why = " ".join(str(exc).split())
            continue
        try:
            return backend.load_delegate(lib, options), ""
        except (ValueError, RuntimeError, OSError) as exc:
            why = f"{lib}: {' '.join(str(exc).split())}"
    return None, why


def _fallback(kind: str, why: str, warn: bool = True) -> str:
    reason = f"{kind} delegate unavailable: {why}"
    if warn:  # not when there is nothing to fall back to: that is an error, raised by the caller
        warnings.warn(reason, DelegateFallback, stacklevel=3)
    return reason
