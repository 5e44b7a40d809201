"""The update error family: one root, one stable code per way an update can be refused or fail.

Each code travels unchanged in ``fieldnode update ... --json``, in MQTT replies and in events, so an operator
can act on it without reading a log. A refused update touches nothing outside its staging area: the active
model stays byte-identical. python-tuf's exceptions are translated into these where they enter our code
(``raise ... from``), so nothing outside this family escapes the update path.
"""

from __future__ import annotations

from device.errors import FieldnodeError


class UpdateError(FieldnodeError):
    """Base of every update error."""

    code = "E_UPDATE"


class SignatureError(UpdateError):
    """Metadata is not signed by the keys its role trusts (a wrong key, a bad signature, tampered bytes)."""

    code = "E_SIGNATURE"


class ThresholdError(UpdateError):
    """Metadata is signed by fewer trusted keys than its role's threshold."""

    code = "E_THRESHOLD"


class ExpiredError(UpdateError):
    """A role's metadata has expired (a freeze attack, or a repository nobody re-signed)."""

    code = "E_EXPIRED"


class RollbackError(UpdateError):
    """Metadata older than what the board already trusts, or a model version below the board's floor."""

    code = "E_ROLLBACK"


class FreezeError(UpdateError):
    """The repository keeps serving the same stale snapshot or timestamp (mix-and-match, freeze)."""

    code = "E_FREEZE"


class MetadataError(UpdateError):
    """Metadata that cannot be parsed or does not follow the format (garbage, a missing field)."""

    code = "E_METADATA"


class TargetRefused(UpdateError):
    """The release is not for this board: hardware class, ring, accelerator or minimum agent version."""

    code = "E_TARGET"


class NotGranted(UpdateError):
    """No release key file for this board, or one that does not open with the board's identity."""

    code = "E_NOT_GRANTED"


class SizeError(UpdateError):
    """A download longer than its signed length, or an input over a hard limit."""

    code = "E_SIZE"


class HashMismatch(UpdateError):
    """Bytes whose hash is not the signed one (ciphertext or plaintext)."""

    code = "E_HASH"


class DecryptError(UpdateError):
    """The age file is malformed, truncated, tampered with or not for the identities given."""

    code = "E_DECRYPT"


class ValidationFailed(UpdateError):
    """The new model would not load, or its test vectors (or a finite-output probe) failed."""

    code = "E_VALIDATE"


class HealthGateFailed(UpdateError):
    """The trial failed: a worker crash, latency past the allowed factor, non-finite outputs, disagreement."""

    code = "E_HEALTH"


class Deferred(UpdateError):
    """Not now: the governor is in its lowest levels, the battery is low, the SoC is hot (retried later)."""

    code = "E_DEFERRED"


class ClockError(UpdateError):
    """The clock reads earlier than a time the board has already seen: expiry cannot be judged."""

    code = "E_CLOCK"


class NoSpace(UpdateError):
    """Not enough free space in the state directory for the download and the inactive slot."""

    code = "E_SPACE"


class Busy(UpdateError):
    """Another install holds the store lock (the agent and the CLI never install at once)."""

    code = "E_BUSY"


class DownloadError(UpdateError):
    """The bytes could not be fetched (network, broker, missing file on a stick), after retries."""

    code = "E_DOWNLOAD"


class StoreError(UpdateError):
    """The A/B store's own state cannot be read or written (a full disk, a corrupt state file set aside)."""

    code = "E_STORE"


class RepositoryError(UpdateError):
    """The operator's repository tool was given something it cannot do (a missing key, a bad role)."""

    code = "E_REPO"
