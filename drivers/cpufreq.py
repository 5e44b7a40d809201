"""CPU frequency policies from ``/sys/devices/system/cpu/cpufreq``: read them, and cap them.

Workflow: :meth:`CpuFreq.policies` reads every ``policyN`` directory into a frozen
:class:`CpufreqPolicy` (re-read on each call: a handful of small files). The governor's plan applier
then calls :meth:`CpuFreq.set_max_khz` (or :meth:`CpuFreq.set_max_fraction`), which snaps the cap to a
frequency the policy supports and writes it to ``scaling_max_freq``, skipping nodes that already hold it.

The cpufreq nodes are root-owned (mode 0644). The fieldnode systemd units make them group-writable for
the ``fieldnode`` group at boot; without them a write is refused. That refusal is not fatal: it is
logged once per :class:`CpuFreq` as a warning naming the remedy, kept in
:attr:`CpuFreq.permission_problem` for status and diag, and the caller goes on with its other knobs.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from typing import Callable

from drivers.errors import SysfsPermissionError
from drivers.sysfs import Sysfs

CPUFREQ_DIR = "sys/devices/system/cpu/cpufreq"

PERMISSION_REMEDY = (
    "scaling_max_freq is not writable by this user; install the fieldnode systemd units (they make the "
    "cpufreq nodes group-writable for the fieldnode group) or run as root"
)

_POLICY_RE = re.compile(r"policy(\d+)")


@dataclass(frozen=True)
class CpufreqPolicy:
    """A snapshot of one cpufreq policy (a group of CPUs that share a clock).

    Attributes:
        name: The directory name, e.g. ``policy0``.
        cpus: The CPUs the policy drives (``affected_cpus``, else ``related_cpus``).
        frequencies_khz: The allowed frequencies, ascending. Without ``scaling_available_frequencies``
            it is ``(min_khz, max_khz)`` and any value in between is allowed (see ``discrete``).
        min_khz: ``cpuinfo_min_freq``, the hardware minimum.
        max_khz: ``cpuinfo_max_freq``, the hardware maximum.
        scaling_max_khz: The current cap (``scaling_max_freq``), or ``None``.
        cur_khz: The current frequency (``scaling_cur_freq``), or ``None``.
        governor: The kernel governor (``scaling_governor``), or ``None``.
        discrete: ``True`` when ``frequencies_khz`` is the driver's table, ``False`` when it is only the
            range.
        available_governors: ``scaling_available_governors``, or ``()`` when the node is missing.
    """

    name: str
    cpus: tuple[int, ...]
    frequencies_khz: tuple[int, ...]
    min_khz: int
    max_khz: int
    scaling_max_khz: int | None = None
    cur_khz: int | None = None
    governor: str | None = None
    discrete: bool = True
    available_governors: tuple[str, ...] = ()


def _parse_cpus(text: str | None) -> tuple[int, ...] | None:
    """``"0 1 2 3"`` (or a range list such as ``"0-3"``) as CPU numbers; ``None`` when unparseable."""
    if not text:
        return None
    cpus: set[int] = set()
    for token in text.replace(",", " ").split():
        low, sep, high = token.partition("-")
        if not (low.isdigit() and (not sep or high.isdigit())):
            return None
        cpus.update(range(int(low), int(high) + 1) if sep else (int(low),))
    return tuple(sorted(cpus)) or None


def _parse_table(text: str | None) -> tuple[int, ...] | None:
    """``scaling_available_frequencies`` as ascending positive kHz; ``None`` when absent or garbled."""
    if not text:
        return None
    tokens = text.split()
    if not all(t.isdigit() for t in tokens):
        return None
    freqs = sorted({int(t) for t in tokens if int(t) > 0})
    return tuple(freqs) or None


class CpuFreq:
    """Reads the cpufreq policies and caps their maximum frequency.

    Args:
        fs: The sysfs root.
        log: Where the once-only permission warning goes.
    """

    def __init__(self, fs: Sysfs, log: logging.Logger = logging.getLogger(__name__)):
        self._fs = fs
        self._log = log
        self._lock = threading.Lock()
        self._permission_problem: str | None = None

    @property
    def permission_problem(self) -> str | None:
        """The remedy message once a write was refused for lack of permission, else ``None``."""
        return self._permission_problem

    def _read_policy(self, rel: str) -> CpufreqPolicy | None:
        name = os.path.basename(rel)
        min_khz = self._fs.read_optional_int(f"{rel}/cpuinfo_min_freq")
        max_khz = self._fs.read_optional_int(f"{rel}/cpuinfo_max_freq")
        if min_khz is None or max_khz is None or not 0 < min_khz <= max_khz:
            # Without the hardware range no cap can be snapped safely: leave the policy alone.
            self._log.debug("%s: cpuinfo min/max %r/%r unusable; policy skipped", rel, min_khz, max_khz)
            return None
        cpus = (_parse_cpus(self._fs.read_optional(f"{rel}/affected_cpus"))
                or _parse_cpus(self._fs.read_optional(f"{rel}/related_cpus"))
                or (int(_POLICY_RE.fullmatch(name).group(1)),))  # policyN is named after its first CPU
        table = _parse_table(self._fs.read_optional(f"{rel}/scaling_available_frequencies"))
        return CpufreqPolicy(
            name=name,
            cpus=cpus,
            frequencies_khz=table or ((min_khz, max_khz) if min_khz < max_khz else (min_khz,)),
            min_khz=min_khz,
            max_khz=max_khz,
            scaling_max_khz=self._fs.read_optional_int(f"{rel}/scaling_max_freq"),
            cur_khz=self._fs.read_optional_int(f"{rel}/scaling_cur_freq"),
            governor=self._fs.read_optional(f"{rel}/scaling_governor"),
            discrete=table is not None,
            available_governors=tuple((self._fs.read_optional(f"{rel}/scaling_available_governors") or "").split()),
        )

    def policies(self) -> tuple[CpufreqPolicy, ...]:
        """Reads every policy that has a usable ``cpuinfo_min_freq``/``cpuinfo_max_freq``.

        Returns:
            The policies in natural order (empty on a board without cpufreq).
        """
        found = []
        for rel in self._fs.glob(f"{CPUFREQ_DIR}/policy*"):
            if _POLICY_RE.fullmatch(os.path.basename(rel)):
                policy = self._read_policy(rel)
                if policy is not None:
                    found.append(policy)
        return tuple(found)

    @staticmethod
    def snap(policy: CpufreqPolicy, khz: float) -> int:
        """The highest frequency the policy allows at or below ``khz``, but at least its minimum.

        Args:
            policy: The policy to snap for.
            khz: The wanted cap in kHz.

        Returns:
            The cap to write, in kHz.
        """
        if not policy.discrete:
            return int(max(policy.min_khz, min(policy.max_khz, math.floor(khz))))
        allowed = [f for f in policy.frequencies_khz if f <= khz]
        return max(allowed) if allowed else policy.frequencies_khz[0]

    def set_max_khz(self, khz: float) -> dict[str, int]:
        """Caps every policy at ``khz``, snapped to what each supports.

        Args:
            khz: The wanted cap in kHz (the hardware maximum lifts the cap).

        Returns:
            ``{policy_name: cap_khz}`` for each policy now capped there: written, or already holding the
            value (then nothing is written). Policies whose write was refused are left out.

        Raises:
            ValueError: ``khz`` is not a finite number.
            SysfsError: A write failed for another reason than permission (the kernel rejected the
                value, the node vanished).
        """
        if isinstance(khz, bool) or not isinstance(khz, (int, float)) or not math.isfinite(khz):
            raise ValueError(f"cpufreq cap must be a finite number of kHz, got {khz!r}")
        return self._apply(lambda p: self.snap(p, khz))

    def set_max_fraction(self, fraction: float) -> dict[str, int]:
        """Caps every policy at ``fraction`` of its hardware maximum, snapped down.

        Args:
            fraction: In ``(0, 1]``; 1 lifts the cap.

        Returns:
            As :meth:`set_max_khz`.

        Raises:
            ValueError: ``fraction`` is not a number in ``(0, 1]``.
            SysfsError: As :meth:`set_max_khz`.
        """
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"cpufreq cap fraction must be a number in (0, 1], got {fraction!r}")
        return self._apply(lambda p: self.snap(p, p.max_khz * fraction))

    def set_governor(self, name: str) -> dict[str, str]:
        """Switches every policy to the kernel governor ``name`` (``ondemand``, ``schedutil``...).

        Args:
            name: The governor, as ``scaling_governor`` takes it.

        Returns:
            ``{policy_name: name}`` for each policy now running it (written, or already running it). Policies
            whose write was refused for lack of permission are left out, as for the cap.

        Raises:
            ValueError: ``name`` is not a plain governor name, or a policy lists its available governors and
                ``name`` is not among them (the message lists them).
            SysfsError: A write failed for another reason than permission.
        """
        if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"cpufreq governor must be a lower-case name such as 'schedutil', got {name!r}")
        done: dict[str, str] = {}
        policies = self.policies()
        for policy in policies:
            if policy.available_governors and name not in policy.available_governors:
                raise ValueError(f"{policy.name} has no cpufreq governor {name!r}; available: "
                                 f"{', '.join(policy.available_governors)}")
        for policy in policies:
            if policy.governor != name:
                try:
                    self._fs.write_text(f"{CPUFREQ_DIR}/{policy.name}/scaling_governor", name)
                except SysfsPermissionError as exc:
                    self._permission_refused(exc)
                    continue
            done[policy.name] = name
        return done

    def _apply(self, target: Callable[[CpufreqPolicy], int]) -> dict[str, int]:
        done: dict[str, int] = {}
        for policy in self.policies():
            khz = target(policy)
            if policy.scaling_max_khz == khz:
                done[policy.name] = khz  # already there: a rewrite would only wake the driver
                continue
            rel = f"{CPUFREQ_DIR}/{policy.name}/scaling_max_freq"
            try:
                self._fs.write_text(rel, khz)
            except SysfsPermissionError as exc:
                self._permission_refused(exc)
                continue
            done[policy.name] = khz
        return done

    def _permission_refused(self, exc: SysfsPermissionError) -> None:
        with self._lock:
            first = self._permission_problem is None
            self._permission_problem = PERMISSION_REMEDY
        if first:  # the governor retries every tick; one warning is enough to act on
            self._log.warning("cannot cap the CPU frequency (%s): %s", exc, PERMISSION_REMEDY)
