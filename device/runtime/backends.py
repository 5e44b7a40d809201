"""Interpreter backends: ai-edge-litert (default) and tflite-runtime (the alternative).

Both expose the same ``Interpreter``/``load_delegate`` API. :func:`load_backend` imports the one the
configuration asks for (``auto`` tries LiteRT first) and says exactly why an import failed, including the
numpy 2 incompatibility of tflite-runtime.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

from device.runtime.errors import BackendUnavailable

BACKEND_CHOICES = ("auto", "litert", "tflite")


@dataclass(frozen=True)
class Backend:
    """An importable interpreter package.

    Attributes:
        name: ``litert`` or ``tflite``.
        version: the package's version string.
        Interpreter: the package's ``Interpreter`` class.
        load_delegate: the package's ``load_delegate`` function.
    """

    name: str
    version: str
    Interpreter: Any
    load_delegate: Callable[..., Any]

    @property
    def label(self) -> str:
        """``name version``, as shown by status and bench."""
        return f"{self.name} {self.version}"


def _import_litert() -> Backend:
    mod = importlib.import_module("ai_edge_litert.interpreter")
    pkg = importlib.import_module("ai_edge_litert")
    return Backend("litert", str(getattr(pkg, "__version__", "unknown")), mod.Interpreter, mod.load_delegate)


class _NumpyTooNew(RuntimeError):
    pass


def _import_tflite() -> Backend:
    if importlib.util.find_spec("tflite_runtime") is None:
        raise ModuleNotFoundError("No module named 'tflite_runtime'", name="tflite_runtime")
    if _numpy_major() >= 2:
        # tflite-runtime imports fine under numpy 2 but its extension fails ("_ARRAY_API not found") or
        # crashes the process on the first Interpreter, so refuse before that happens.
        raise _NumpyTooNew("numpy 2 is installed")
    mod = importlib.import_module("tflite_runtime.interpreter")
    pkg = importlib.import_module("tflite_runtime")
    return Backend("tflite", str(getattr(pkg, "__version__", "unknown")), mod.Interpreter, mod.load_delegate)


def _numpy_major() -> int:
    try:
        import numpy

        return int(numpy.__version__.split(".")[0])
    except Exception:  # pragma: no cover - numpy is a hard dependency
        return 0


def _reason(name: str, exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    if name == "tflite":
        if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.startswith("tflite_runtime"):
            return "tflite-runtime is not installed (pip install 'fieldnode[tflite]'; it needs numpy<2)"
        if isinstance(exc, _NumpyTooNew):
            return (
                f"tflite-runtime cannot run under numpy {_numpy_version()}: it was built against numpy 1.x "
                "and fails ('_ARRAY_API not found') or crashes under numpy 2; install numpy<2 in the agent's "
                "venv, or use backend = \"litert\""
            )
    if name == "litert" and isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.startswith("ai_edge_litert"):
        return "ai-edge-litert is not installed (pip install ai-edge-litert)"
    return text


def _numpy_version() -> str:
    import numpy

    return numpy.__version__


_IMPORTERS = {"litert": _import_litert, "tflite": _import_tflite}
_cache: dict[str, Backend] = {}


def load_backend(choice: str = "auto") -> Backend:
    """Imports and returns the interpreter backend for ``choice``.

    Args:
        choice: ``auto`` (LiteRT, then tflite-runtime), ``litert`` or ``tflite``.

    Returns:
        The imported backend.

    Raises:
        BackendUnavailable: the backend (or, for ``auto``, every backend) failed to import; the message
            carries each reason.
        ValueError: ``choice`` is not one of :data:`BACKEND_CHOICES`.
    """
    if choice not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_CHOICES)}, got {choice!r}")
    names = ("litert", "tflite") if choice == "auto" else (choice,)
    reasons = []
    for name in names:
        if name in _cache:
            return _cache[name]
        try:
            backend = _IMPORTERS[name]()
        except Exception as exc:  # ImportError, and the AttributeError/RuntimeError numpy ABI breaks raise
            reasons.append(f"{name}: {_reason(name, exc)}")
            continue
        _cache[name] = backend
        return backend
    raise BackendUnavailable("no TFLite interpreter backend could be loaded: " + "; ".join(reasons))
