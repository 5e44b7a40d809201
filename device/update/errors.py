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

    code = "update_failed"


class SignatureError(UpdateError):
    """Metadata is not signed by the keys its role trusts (a wrong key, a bad signature, tampered bytes)."""

    code = "metadata_signature_invalid"


class ThresholdError(UpdateError):
    """Metadata is signed by fewer trusted keys than its role's threshold."""

    code = "too_few_signatures"


class ExpiredError(UpdateError):
    """A role's metadata has expired (a freeze attack, or a repository nobody re-signed)."""

    code = "metadata_expired"


class RollbackError(UpdateError):
    """Metadata older than what the board already trusts, or a model version below the board's floor."""

    code = "rollback_refused"


class MetadataError(UpdateError):
    """Metadata that cannot be parsed or does not follow the format (garbage, a missing field)."""

    code = "metadata_invalid"


class TargetRefused(UpdateError):
    """The release is not for this board: hardware class, ring, accelerator or minimum agent version."""

    code = "not_for_this_board"


class NotGranted(UpdateError):
    """No release key file for this board, or one that does not open with the board's identity."""

    code = "not_granted"


class SizeError(UpdateError):
    """A download longer than its signed length, or an input over a hard limit."""

    code = "size_exceeded"


class HashMismatch(UpdateError):
    """Bytes whose hash is not the signed one (ciphertext or plaintext)."""

    code = "hash_mismatch"


class DecryptError(UpdateError):
    """The age file is malformed, truncated, tampered with or not for the identities given."""

    code = "decrypt_failed"


class ValidationFailed(UpdateError):
    """The new model would not load, or its test vectors (or a finite-output probe) failed."""

    code = "validation_failed"


class HealthGateFailed(UpdateError):
    """The trial failed: a worker crash, latency past the allowed factor, non-finite outputs, disagreement."""

    code = "trial_failed"


class Deferred(UpdateError):
    """Not now: the governor is in its lowest levels, the battery is low, the SoC is hot (retried later)."""

    code = "update_deferred"


class ClockError(UpdateError):
    """The clock reads earlier than a time the board has already seen: expiry cannot be judged."""

    code = "clock_behind"


class NoSpace(UpdateError):
    """Not enough free space in the state directory for the download and the inactive slot."""

    code = "no_space"


class Busy(UpdateError):
    """Another install holds the store lock (the agent and the CLI never install at once)."""

    code = "update_busy"


class DownloadError(UpdateError):
    """The bytes could not be fetched (network, broker, missing file on a stick), after retries."""

    code = "download_failed"


class StoreError(UpdateError):
    """The A/B store's own state cannot be read or written (a full disk, a corrupt state file set aside)."""

    code = "model_store_error"


class RepositoryError(UpdateError):
    """The operator's repository tool was given something it cannot do (a missing key, a bad role)."""

    code = "repository_error"


class UnsafeFile(UpdateError):
    """A directory repository (a USB stick) holds, where a file is read, something other than a regular file inside
    it: a symbolic link, a FIFO, a device. Never followed or opened: a stick must not make the board read its own
    files or hang."""

    code = "unsafe_repository_file"
