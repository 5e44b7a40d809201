"""Runtime errors: one family under :class:`device.errors.FieldnodeError`, each with a stable code."""

from __future__ import annotations

from device.errors import FieldnodeError


class RuntimeFault(FieldnodeError):
    """Base of the inference runtime's errors."""

    code = "runtime_error"


class BackendUnavailable(RuntimeFault):
    """No usable TFLite interpreter package could be imported."""

    code = "backend_unavailable"


class DelegateUnavailable(RuntimeFault):
    """An explicitly requested delegate (``edgetpu`` or ``gpu``) cannot be used, and falling back to the CPU
    is not allowed (``runtime.delegate_fallback``); the message gives the delegate loader's reason."""

    code = "delegate_unavailable"


class ModelInvalid(RuntimeFault):
    """A model file or manifest is malformed or missing; the message names what is wrong."""

    code = "model_invalid"


class InputInvalid(RuntimeFault):
    """An inference input has the wrong shape, dtype or count."""

    code = "input_invalid"


class InferenceFailed(RuntimeFault):
    """An inference request did not produce a result."""

    code = "inference_failed"


class WorkerCrashed(InferenceFailed):
    """The worker process died (signal or exit) while loading a model or serving a request."""

    code = "worker_crashed"


class WorkerTimeout(InferenceFailed):
    """The worker did not answer within its deadline and was killed."""

    code = "worker_timeout"


class ModelQuarantined(InferenceFailed):
    """The model file crashed its worker too many times in a row and is no longer loaded.

    ``newly`` is True when the failure that raised it is the one that quarantined the file (and so worth an
    event), False when the file was already quarantined and was refused without being loaded.
    """

    code = "model_quarantined"

    def __init__(self, message: str = "", *, newly: bool = False) -> None:
        super().__init__(message)
        self.newly = newly


class NotServing(InferenceFailed):
    """No variant of the model can serve now (each one crashed, is quarantined, is invalid, or the requested
    delegate is unavailable); the message gives the reason. The runtime retries by itself (see
    :class:`device.runtime.runtime.Runtime`)."""

    code = "not_serving"


class RuntimeClosed(InferenceFailed):
    """The runtime or engine has been closed."""

    code = "runtime_closed"
