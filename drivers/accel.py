"""Accelerator discovery: what can run inference on this board, read from sysfs, /proc, /dev and /etc.

:func:`discover` looks, read-only and through a :class:`drivers.sysfs.Sysfs` root (so tests and a
technician's copy of a board's tree work the same), for

* USB Coral Edge TPUs in ``sys/bus/usb/devices``: ``1a6e:089a`` (Global Unichip) is a TPU whose firmware is
  not loaded yet; libedgetpu loads it on first use and the device re-enumerates as ``18d1:9302`` (Google);
* PCIe/M.2 Coral Edge TPUs: the ``dev/apex_*`` nodes of the gasket/apex driver;
* NVIDIA Jetson boards: the device-tree model or ``etc/nv_tegra_release`` (L4T), and whether the GPU is
  exposed;
* the CPU: architecture, model, cores and the SIMD features that matter to TFLite kernels.

It returns a frozen :class:`Accelerators` snapshot with :meth:`Accelerators.summary` (one human line per
finding, for diag and status) and :meth:`Accelerators.to_dict`. Nothing here raises for an absent,
unreadable or garbled node: unknown is ``None`` or empty.
"""

from __future__ import annotations

import enum
import os
import platform
import re
from dataclasses import dataclass
from typing import Any

from drivers.sysfs import Sysfs, resolve_root

USB_DEVICES = "sys/bus/usb/devices"
EDGETPU_IDS = {("1a6e", "089a"), ("18d1", "9302")}
JETSON_GPU_NODES = ("dev/nvgpu", "dev/nvhost-ctrl-gpu", "sys/devices/platform/gpu.0", "sys/devices/platform/17000000.gpu")
DT_MODEL = ("proc/device-tree/model", "sys/firmware/devicetree/base/model")
# The CPU features worth showing: what TFLite's optimised kernels (XNNPACK, ruy) use.
INTERESTING_FEATURES = ("neon", "asimd", "asimddp", "sve", "avx", "avx2", "avx512f", "fma")


class UsbTpuState(enum.Enum):
    """Where a USB Edge TPU is in its boot."""

    NO_FIRMWARE = "no_firmware"  # 1a6e:089a: libedgetpu loads the firmware on first use
    READY = "ready"  # 18d1:9302: firmware running


@dataclass(frozen=True)
class UsbDevice:
    """A USB Edge TPU.

    Attributes:
        name: The sysfs device name (``2-1``: bus 2, port 1).
        vendor: ``idVendor`` (hex).
        product: ``idProduct`` (hex).
        state: Whether its firmware is loaded.
        busnum: USB bus number, if readable.
        devnum: Device number on the bus, if readable.
        product_name: The ``product`` string, if any.
        speed_mbps: Link speed (480 is USB 2, 5000 and up USB 3), if readable.
    """

    name: str
    vendor: str
    product: str
    state: UsbTpuState
    busnum: int | None = None
    devnum: int | None = None
    product_name: str | None = None
    speed_mbps: int | None = None


@dataclass(frozen=True)
class JetsonInfo:
    """An NVIDIA Jetson board.

    Attributes:
        model: The device-tree model (``NVIDIA Jetson Orin Nano Developer Kit``), if known.
        l4t: The L4T release (``36.3.0``), if ``etc/nv_tegra_release`` says.
        gpu: Whether a GPU device node is exposed (in a container it may be hidden).
    """

    model: str | None
    l4t: str | None
    gpu: bool


@dataclass(frozen=True)
class CpuInfo:
    """The CPU.

    Attributes:
        arch: ``platform.machine()`` on the live root, else guessed from ``proc/cpuinfo`` (``unknown`` if not).
        model: The board or CPU model: cpuinfo's ``Model`` (Raspberry Pi), the device-tree model, or cpuinfo's
            ``model name`` (x86).
        cores: The number of ``processor`` entries (0 when unknown).
        features: The interesting entries of ``Features`` (ARM) or ``flags`` (x86), in a fixed order.
        board: The device-tree model, or the DMI product name on a PC.
    """

    arch: str
    model: str | None
    cores: int
    features: tuple[str, ...]
    board: str | None


@dataclass(frozen=True)
class Accelerators:
    """What :func:`discover` found.

    Attributes:
        edgetpu_usb: USB Edge TPUs.
        edgetpu_pci: PCIe Edge TPU device nodes (``/dev/apex_0``).
        jetson: The Jetson board, if this is one.
        cpu: The CPU.
    """

    edgetpu_usb: tuple[UsbDevice, ...]
    edgetpu_pci: tuple[str, ...]
    jetson: JetsonInfo | None
    cpu: CpuInfo

    @property
    def has_edgetpu(self) -> bool:
        """Whether any Edge TPU (USB or PCIe) is present."""
        return bool(self.edgetpu_usb or self.edgetpu_pci)

    def kinds(self) -> list[str]:
        """The accelerators present, by kind (``edgetpu``, ``jetson-gpu``): what a fleet counts boards by, a few
        bytes in the retained state (:meth:`summary` is for people)."""
        out = ["edgetpu"] if self.has_edgetpu else []
        if self.jetson is not None and self.jetson.gpu:
            out.append("jetson-gpu")
        return out

    def summary(self) -> list[str]:
        """One line per finding, for people (diag, status)."""
        lines = []
        for dev in self.edgetpu_usb:
            where = f"USB {dev.name}" + (f" (bus {dev.busnum} device {dev.devnum})" if dev.busnum is not None else "")
            if dev.state is UsbTpuState.READY:
                state = f"firmware loaded ({dev.vendor}:{dev.product})"
            else:
                state = f"firmware not loaded yet ({dev.vendor}:{dev.product}; libedgetpu loads it on first use)"
            speed = ""
            if dev.speed_mbps is not None:
                speed = f", {dev.speed_mbps} Mb/s"
                if dev.speed_mbps < 5000:
                    speed += " (USB 2: plug it into a USB 3 port for full speed)"
            lines.append(f"Edge TPU on {where}: {state}{speed}")
        for node in self.edgetpu_pci:
            lines.append(f"Edge TPU on PCIe: {node}")
        if self.jetson is not None:
            j = self.jetson
            parts = [j.model or "NVIDIA Jetson (model unknown)"]
            parts.append(f"L4T {j.l4t}" if j.l4t else "L4T release unknown")
            parts.append("GPU present" if j.gpu else "no GPU device node visible")
            lines.append("Jetson: " + ", ".join(parts))
        if not self.has_edgetpu and not (self.jetson and self.jetson.gpu):
            lines.append("No accelerator found: inference runs on the CPU")
        c = self.cpu
        text = f"CPU: {c.arch}, {c.cores or 'unknown number of'} cores"
        if c.model:
            text += f", {c.model}"
        if c.board and c.board != c.model:
            text += f" on {c.board}"
        text += f", features {' '.join(c.features)}" if c.features else ", no SIMD features listed"
        lines.append(text)
        return lines

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (enums as their values)."""
        return {
            "edgetpu_usb": [
                {
                    "name": d.name,
                    "vendor": d.vendor,
                    "product": d.product,
                    "state": d.state.value,
                    "busnum": d.busnum,
                    "devnum": d.devnum,
                    "product_name": d.product_name,
                    "speed_mbps": d.speed_mbps,
                }
                for d in self.edgetpu_usb
            ],
            "edgetpu_pci": list(self.edgetpu_pci),
            "jetson": None
            if self.jetson is None
            else {"model": self.jetson.model, "l4t": self.jetson.l4t, "gpu": self.jetson.gpu},
            "cpu": {
                "arch": self.cpu.arch,
                "model": self.cpu.model,
                "cores": self.cpu.cores,
                "features": list(self.cpu.features),
                "board": self.cpu.board,
            },
        }


def _read(fs: Sysfs, rel: str) -> str | None:
    # Discovery never raises: a node that errors (EIO from a flaky driver) is as unknown as an absent one.
    text = fs.read_optional(rel)
    if text is None:
        return None
    text = text.replace("\x00", " ").strip()  # device-tree strings end with a NUL byte
    return text or None


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(float(text))  # speed can be "1.5" (low-speed USB)
    except (ValueError, OverflowError):
        return None


def _exists(fs: Sysfs, rel: str) -> bool:
    try:
        return fs.exists(rel)
    except (OSError, ValueError):
        return False


def _glob(fs: Sysfs, pattern: str) -> list[str]:
    try:
        return fs.glob(pattern)
    except (OSError, ValueError):
        return []


def _usb_tpus(fs: Sysfs) -> tuple[UsbDevice, ...]:
    found = []
    for rel in _glob(fs, f"{USB_DEVICES}/*"):
        vendor = (_read(fs, f"{rel}/idVendor") or "").lower()
        product = (_read(fs, f"{rel}/idProduct") or "").lower()
        if (vendor, product) not in EDGETPU_IDS:
            continue  # interfaces (2-1:1.0) have no ids, other devices have other ids
        found.append(
            UsbDevice(
                name=os.path.basename(rel),
                vendor=vendor,
                product=product,
                state=UsbTpuState.READY if vendor == "18d1" else UsbTpuState.NO_FIRMWARE,
                busnum=_int(_read(fs, f"{rel}/busnum")),
                devnum=_int(_read(fs, f"{rel}/devnum")),
                product_name=_read(fs, f"{rel}/product"),
                speed_mbps=_int(_read(fs, f"{rel}/speed")),
            )
        )
    return tuple(found)


def _device_tree_model(fs: Sysfs) -> str | None:
    for rel in DT_MODEL:
        model = _read(fs, rel)
        if model:
            return model
    return None


def _jetson(fs: Sysfs, dt_model: str | None) -> JetsonInfo | None:
    release = _read(fs, "etc/nv_tegra_release") or ""
    match = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([0-9][0-9.]*)", release)
    l4t = f"{match.group(1)}.{match.group(2).rstrip('.')}" if match else None
    is_jetson = bool(dt_model and "nvidia jetson" in dt_model.lower())
    if not is_jetson and l4t is None:
        return None
    gpu = any(_exists(fs, rel) for rel in JETSON_GPU_NODES)
    return JetsonInfo(model=dt_model, l4t=l4t, gpu=gpu)


def _cpuinfo_fields(text: str) -> tuple[dict[str, str], int]:
    # The first value of each key, and how many "processor" entries there are.
    fields: dict[str, str] = {}
    cores = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "processor":
            cores += 1
        fields.setdefault(key, value)
    return fields, cores


def _guess_arch(fields: dict[str, str]) -> str:
    flags = fields.get("flags", "").split()
    if flags or fields.get("vendor_id") in ("GenuineIntel", "AuthenticAMD"):
        return "x86_64" if "lm" in flags else "i686"
    if "asimd" in fields.get("Features", "").split():
        # Only a 64-bit kernel names Advanced SIMD "asimd" (a 32-bit one says "neon"), whatever the
        # "model name" claims: Jetsons print "ARMv8 Processor rev 1 (v8l)" on aarch64.
        return "aarch64"
    match = re.search(r"\((v\d+l)\)", fields.get("model name", ""))  # "ARMv7 Processor rev 3 (v7l)"
    if match:
        return "arm" + match.group(1)
    arch = fields.get("CPU architecture", "")
    if arch in ("6", "7", "8"):
        return f"armv{arch}l"  # without asimd, an ARMv8 core runs a 32-bit kernel
    return "unknown"


def _dmi_product(fs: Sysfs) -> str | None:
    product = _read(fs, "sys/class/dmi/id/product_name")
    if product and product.lower() not in ("to be filled by o.e.m.", "default string", "system product name"):
        return product
    return None


def _cpu(fs: Sysfs, dt_model: str | None) -> CpuInfo:
    fields, cores = _cpuinfo_fields(_read(fs, "proc/cpuinfo") or "")
    live = fs.root == os.path.abspath(os.sep)
    arch = platform.machine() if live else _guess_arch(fields)
    if live and cores == 0:
        cores = os.cpu_count() or 0
    model = fields.get("Model") or dt_model or fields.get("model name") or None
    raw = (fields.get("Features") or fields.get("flags") or "").split()
    features = tuple(f for f in INTERESTING_FEATURES if f in raw)
    board = dt_model or _dmi_product(fs)
    return CpuInfo(arch=arch or "unknown", model=model, cores=cores, features=features, board=board)


def discover(fs: Sysfs | None = None) -> Accelerators:
    """Looks for accelerators and describes the CPU.

    Args:
        fs: The tree to read; the configured sysfs root (``FIELDNODE_SYSFS_ROOT`` or ``/``) when ``None``.

    Returns:
        The snapshot. Never raises for missing or garbled nodes.
    """
    fs = fs if fs is not None else Sysfs(resolve_root())
    dt_model = _device_tree_model(fs)
    return Accelerators(
        edgetpu_usb=_usb_tpus(fs),
        edgetpu_pci=tuple("/" + rel for rel in _glob(fs, "dev/apex_*")),
        jetson=_jetson(fs, dt_model),
        cpu=_cpu(fs, dt_model),
    )


__all__ = ["Accelerators", "CpuInfo", "JetsonInfo", "UsbDevice", "UsbTpuState", "discover"]
