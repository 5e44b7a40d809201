"""The naming rules and the signed release facts that the repository tool and the board share.

One module, two importers (``tools/repo/release.py`` writes what this describes, ``device/update/client.py``
reads it), so the two sides cannot drift:

* **Target paths**: a model release is the TUF target ``models/<name>/<variant>/<version>.tflite.age`` (the
  ciphertext; in a consistent-snapshot repository its file is ``<sha256>.<version>.tflite.age`` beside it), its
  test vectors ``models/<name>/<variant>/<version>.testvectors<.ext>.age``.
* **Grant path**: a board's release-key file is ``grants/<release-id>/<sha256(UTF-8 device id)[:16] hex>.age``.
* **Facts**: the target's signed ``custom`` (see docs/updates.md, "What add-model signs")::

    {"kind": "model", "name": "vibration", "variant": "full", "version": 3, "release": "vibration-full-3-1a2b3c4d",
     "plaintext": {"sha256": "<hex>", "length": 123456}, "hwclass": ["rpi4"], "ring": "stable",
     "min_agent": "0.4.0", "test_vectors": {"target": "models/...", "sha256": "<hex>", "length": 4567} or null,
     "encryption": "age"}

  :func:`model_facts` builds it; :func:`parse_model_facts` reads it back and refuses anything malformed with a
  :class:`~device.update.errors.MetadataError` naming the target and the field. Unknown extra fields are ignored,
  so a newer tool may add facts that older boards do not need.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Mapping

from device.update.errors import MetadataError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
SEMVER_RE = re.compile(r"(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})\Z")
# A release id is one URL path segment: no '/', never '.' or '..' (it starts with a letter or digit).
RELEASE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}\Z")
_SHA256_RE = re.compile(r"[0-9a-f]{64}\Z")
_EXT_RE = re.compile(r"\.[A-Za-z0-9]{1,8}\Z")
MAX_VERSION = 2**53 - 1  # a JSON number every parser reads exactly
DEFAULT_RING = "stable"
GRANTS_DIR = "grants"
MODELS_DIR = "models"
ENCRYPTION = "age"
ACCELERATORS = ("edgetpu",)


def model_target_path(name: str, variant: str, version: int) -> str:
    """The TUF target path of a model release (the ciphertext)."""
    return f"{MODELS_DIR}/{name}/{variant}/{version}.tflite.age"


def vectors_target_path(name: str, variant: str, version: int, ext: str = "") -> str:
    """The TUF target path of a release's test vectors; ``ext`` (``.npz``) is kept only when it is a plain
    extension, so no path character ever comes from a file name."""
    ext = ext if _EXT_RE.match(ext or "") else ""
    return f"{MODELS_DIR}/{name}/{variant}/{version}.testvectors{ext}.age"


def grant_name(release: str, device_id: str) -> str:
    """The grant's path under the grants directory (``<release>/<hash>.age``), as the board appends it to its
    grants URL.

    The board id is hashed so that the published directory neither lists the fleet's ids nor depends on which
    characters an id uses; 64 bits keep collisions out of reach for any fleet size.
    """
    return f"{release}/{hashlib.sha256(device_id.encode()).hexdigest()[:16]}.age"


def grant_path(release: str, device_id: str) -> str:
    """The grant's path under the repository, ``grants/<release>/<hash>.age``, ``/``-separated."""
    return f"{GRANTS_DIR}/{grant_name(release, device_id)}"


def model_facts(*, name: str, variant: str, version: int, release: str, sha256: str, length: int, hwclass,
                ring: str, min_agent: str | None, test_vectors: dict | None) -> dict:
    """The signed ``custom`` of a model target (the operator's tool writes it, :func:`parse_model_facts` reads it)."""
    return {"kind": "model", "name": name, "variant": variant, "version": version, "release": release,
            "plaintext": {"sha256": sha256, "length": length}, "hwclass": list(hwclass), "ring": ring,
            "min_agent": min_agent, "test_vectors": test_vectors, "encryption": ENCRYPTION}


def vectors_facts(*, name: str, variant: str, version: int, release: str, sha256: str, length: int) -> dict:
    """The signed ``custom`` of a test-vectors target."""
    return {"kind": "test_vectors", "name": name, "variant": variant, "version": version, "release": release,
            "plaintext": {"sha256": sha256, "length": length}}


def vectors_ref(target: str, sha256: str, length: int) -> dict:
    """The ``test_vectors`` entry of a model's facts: which target holds them and their plaintext facts."""
    return {"target": target, "sha256": sha256, "length": length}


@dataclass(frozen=True)
class PlainFacts:
    """What a target decrypts to, as signed: the plaintext's sha256 (hex) and length.

    Attributes:
        path: The target path (the ciphertext) these facts belong to.
        sha256: Lowercase hex of the plaintext's sha256.
        length: The plaintext's length in bytes.
    """

    path: str
    sha256: str
    length: int


@dataclass(frozen=True)
class ModelFacts:
    """The parsed, checked ``custom`` of a model target.

    Attributes:
        path: The target path. name, variant, version: Which model release. release: The release id.
        plaintext: The signed plaintext facts of the model file.
        hwclass: Hardware classes that may install it (empty: any). ring: Its rollout ring.
        min_agent: The lowest agent version (``X.Y.Z``) that may install it, or None.
        test_vectors: The signed plaintext facts of its test-vectors target, or None.
        requires: The accelerator the variant needs (``edgetpu``), or None.
    """

    path: str
    name: str
    variant: str
    version: int
    release: str
    plaintext: PlainFacts
    hwclass: tuple
    ring: str
    min_agent: str | None
    test_vectors: PlainFacts | None
    requires: str | None


def _bad(path: str, field: str, expected: str, got: Any) -> MetadataError:
    shown = repr(got)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return MetadataError(f"target {path}: signed custom.{field}: expected {expected}, got {shown}")


def _name(path: str, custom: Mapping, field: str, rule=NAME_RE) -> str:
    value = custom.get(field)
    if not isinstance(value, str) or not rule.match(value):
        raise _bad(path, field, "a name of letters, digits, '.', '_', '-'", value)
    return value


def _int(path: str, field: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_VERSION:
        raise _bad(path, field, f"an integer from {low} to {MAX_VERSION}", value)
    return value


def _plain(path: str, field: str, value: Any, sha_key: str = "sha256", len_key: str = "length") -> tuple:
    if not isinstance(value, Mapping):
        raise _bad(path, field, "an object", value)
    sha = value.get(sha_key)
    if not isinstance(sha, str) or not _SHA256_RE.match(sha):
        raise _bad(path, f"{field}.{sha_key}", "64 lowercase hex digits", sha)
    return sha, _int(path, f"{field}.{len_key}", value.get(len_key), 0)


def variant_requires(variant: str, custom: Mapping | None = None) -> str | None:
    """The accelerator a variant needs: ``custom["requires"]`` when signed, else by name (``edgetpu``, or a name
    ending in ``_edgetpu``/``-edgetpu``, as model manifests name Edge TPU files)."""
    if custom is not None and custom.get("requires") is not None:
        return custom["requires"]
    if variant == "edgetpu" or variant.endswith(("_edgetpu", "-edgetpu")):
        return "edgetpu"
    return None


def parse_model_facts(path: str, custom: Any) -> ModelFacts:
    """Reads and checks the signed ``custom`` of a model target.

    Args:
        path: The target path (it must be :func:`model_target_path` of the facts' name, variant and version).
        custom: ``TargetFile.custom``.

    Returns:
        The facts.

    Raises:
        MetadataError: A missing or malformed field; the message names the target and the field.
    """
    if not isinstance(custom, Mapping):
        raise _bad(path, "", "an object", custom)
    if custom.get("kind") != "model":
        raise _bad(path, "kind", "'model'", custom.get("kind"))
    name, variant = _name(path, custom, "name"), _name(path, custom, "variant")
    version = _int(path, "version", custom.get("version"), 1)
    if path != model_target_path(name, variant, version):
        raise MetadataError(f"target {path}: its signed facts name {model_target_path(name, variant, version)}; "
                            f"a model target must be listed under the path its name, variant and version give")
    release = _name(path, custom, "release", RELEASE_RE)
    sha, length = _plain(path, "plaintext", custom.get("plaintext"))
    hwclass = custom.get("hwclass", [])
    if not isinstance(hwclass, list) or not all(isinstance(c, str) and NAME_RE.match(c) for c in hwclass):
        raise _bad(path, "hwclass", "a list of hardware class names", hwclass)
    ring = _name(path, custom, "ring")
    min_agent = custom.get("min_agent")
    if min_agent is not None and (not isinstance(min_agent, str) or not SEMVER_RE.match(min_agent)):
        raise _bad(path, "min_agent", "null or a version like 0.4.0", min_agent)
    if custom.get("encryption", ENCRYPTION) != ENCRYPTION:
        raise _bad(path, "encryption", f"{ENCRYPTION!r} (the only format this board reads)", custom["encryption"])
    requires = custom.get("requires")
    if requires is not None and requires not in ACCELERATORS:
        raise _bad(path, "requires", f"null or one of {', '.join(ACCELERATORS)}", requires)
    vectors = custom.get("test_vectors")
    tv = None
    if vectors is not None:
        if not isinstance(vectors, Mapping):
            raise _bad(path, "test_vectors", "null or an object", vectors)
        target = vectors.get("target")
        prefix = f"{MODELS_DIR}/{name}/{variant}/{version}.testvectors"
        if not isinstance(target, str) or not target.startswith(prefix) or not target.endswith(".age"):
            raise _bad(path, "test_vectors.target", f"a target path starting with {prefix}", target)
        tv = PlainFacts(target, *_plain(path, "test_vectors", vectors))
    return ModelFacts(path=path, name=name, variant=variant, version=version, release=release,
                      plaintext=PlainFacts(path, sha, length), hwclass=tuple(hwclass), ring=ring,
                      min_agent=min_agent, test_vectors=tv, requires=variant_requires(variant, custom))


def parse_version(text: Any) -> tuple:
    """An agent version as a comparable key: ``(major, minor, patch, 0 for a pre-release else 1)``.

    ``0.4.0`` > ``0.4.0rc1`` = ``0.4.0.dev3`` = ``0.4.0-beta`` (pre-releases sort below their release);
    ``0.4.0+local`` and ``0.4.0.post1`` count as ``0.4.0``; ``0.4`` is ``0.4.0``.

    Raises:
        ValueError: Not a version (no leading ``X.Y``).
    """
    m = re.match(r"(\d{1,9})\.(\d{1,9})(?:\.(\d{1,9}))?(.*)\Z", text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"{text!r} is not a version like 0.4.0")
    rest = m.group(4)
    final = rest == "" or rest.startswith(("+", ".post", "post"))
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0), 1 if final else 0
