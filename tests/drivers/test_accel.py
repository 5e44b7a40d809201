"""Accelerator discovery on fake board trees (Pi 4, Pi 5 with a USB Coral, Coral PCIe, Jetson, x86)."""

from __future__ import annotations

import json
import os
import platform

import pytest

from drivers.accel import UsbTpuState, discover
from drivers.errors import SysfsError
from drivers.sysfs import Sysfs

PI4_CPUINFO = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
    f"CPU architecture: 8\nCPU part\t: 0xd08\n\n"
    for i in range(4)
) + "Revision\t: d03114\nSerial\t\t: 10000000abcdef01\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"

PI5_CPUINFO = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
    f"asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\n\n"
    for i in range(4)
) + "Revision\t: d04170\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"

ORIN_CPUINFO = "".join(
    f"processor\t: {i}\nmodel name\t: ARMv8 Processor rev 1 (v8l)\nBogoMIPS\t: 62.50\nFeatures\t: fp asimd "
    f"evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp uscat ilrcpc "
    f"flagm paca pacg\nCPU architecture: 8\n\n"
    for i in range(6)
)

X86_CPUINFO = "".join(
    f"processor\t: {i}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 142\n"
    f"model name\t: Intel(R) Core(TM) i7-8550U CPU @ 1.80GHz\nflags\t\t: fpu vme de pse tsc msr pae mce cx8 "
    f"apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm "
    f"constant_tsc pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand avx2 bmi2\n\n"
    for i in range(8)
)

ORIN_RELEASE = (
    "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, DATE: Mon May  6 17:34:21 UTC 2024\n"
    "# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n"
)


def build(root, files: dict[str, str | bytes | None]) -> Sysfs:
    """Writes a fake tree: text or bytes become files, ``None`` an empty directory."""
    for rel, content in files.items():
        path = root / rel
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return Sysfs(str(root))


def usb_device(name: str, vendor: str, product: str, *, busnum=2, devnum=3, speed="5000", product_name=None) -> dict:
    """A USB device the way the kernel lays it out: under sys/devices, linked from sys/bus/usb/devices."""
    base = f"sys/devices/platform/axi/1000120000.pcie/usb{busnum}/{name}"
    files = {
        f"{base}/idVendor": vendor + "\n",
        f"{base}/idProduct": product + "\n",
        f"{base}/busnum": f"{busnum}\n",
        f"{base}/devnum": f"{devnum}\n",
        f"{base}/speed": speed + "\n",
        f"{base}/{name}:1.0/bInterfaceClass": "ff\n",  # an interface: no ids of its own
    }
    if product_name:
        files[f"{base}/product"] = product_name + "\n"
    return files


def link_usb(root, *names: str, busnum=2) -> None:
    bus = root / "sys/bus/usb/devices"
    bus.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = root / f"sys/devices/platform/axi/1000120000.pcie/usb{busnum}/{name}"
        os.symlink(target, bus / name)
        if (target / f"{name}:1.0").exists():
            os.symlink(target / f"{name}:1.0", bus / f"{name}:1.0")


def test_pi4_without_accelerators(tmp_path):
    fs = build(tmp_path, {
        "proc/cpuinfo": PI4_CPUINFO,
        "proc/device-tree/model": b"Raspberry Pi 4 Model B Rev 1.4\x00",
        **usb_device("1-1", "2109", "3431", busnum=1, devnum=2, speed="480"),  # the VL805 hub
    })
    link_usb(tmp_path, "1-1", busnum=1)
    found = discover(fs)
    assert found.edgetpu_usb == () and found.edgetpu_pci == () and found.jetson is None and not found.has_edgetpu
    assert found.kinds() == []
    cpu = found.cpu
    assert (cpu.arch, cpu.cores, cpu.features) == ("aarch64", 4, ("asimd",))
    assert cpu.model == "Raspberry Pi 4 Model B Rev 1.4" and cpu.board == "Raspberry Pi 4 Model B Rev 1.4"
    assert found.summary() == [
        "No accelerator found: inference runs on the CPU",
        "CPU: aarch64, 4 cores, Raspberry Pi 4 Model B Rev 1.4, features asimd",
    ]


def test_pi5_with_a_usb_coral_before_its_firmware_is_loaded(tmp_path):
    fs = build(tmp_path, {
        "proc/cpuinfo": PI5_CPUINFO,
        "proc/device-tree/model": b"Raspberry Pi 5 Model B Rev 1.0\x00",
        **usb_device("2-1", "1a6e", "089a", busnum=2, devnum=2, speed="5000"),
    })
    link_usb(tmp_path, "2-1")
    found = discover(fs)
    (tpu,) = found.edgetpu_usb
    assert (tpu.name, tpu.vendor, tpu.product, tpu.state) == ("2-1", "1a6e", "089a", UsbTpuState.NO_FIRMWARE)
    assert (tpu.busnum, tpu.devnum, tpu.speed_mbps, tpu.product_name) == (2, 2, 5000, None)
    assert found.cpu.features == ("asimd", "asimddp")
    assert found.summary()[0] == (
        "Edge TPU on USB 2-1 (bus 2 device 2): firmware not loaded yet (1a6e:089a; libedgetpu loads it on first "
        "use), 5000 Mb/s"
    )
    assert not any(line.startswith("No accelerator") for line in found.summary())


def test_pi5_with_a_usb_coral_after_its_firmware_is_loaded_on_usb2(tmp_path):
    fs = build(tmp_path, {
        "proc/cpuinfo": PI5_CPUINFO,
        **usb_device("1-2", "18d1", "9302", busnum=1, devnum=4, speed="480", product_name="Coral USB Accelerator"),
    })
    link_usb(tmp_path, "1-2", busnum=1)
    (tpu,) = discover(fs).edgetpu_usb
    assert tpu.state is UsbTpuState.READY and tpu.product_name == "Coral USB Accelerator"
    line = discover(fs).summary()[0]
    assert "firmware loaded (18d1:9302)" in line and "480 Mb/s (USB 2: plug it into a USB 3 port" in line


def test_coral_pcie_apex_node(tmp_path):
    fs = build(tmp_path, {"proc/cpuinfo": PI5_CPUINFO, "dev/apex_0": "", "dev/apex_1": ""})
    found = discover(fs)
    assert found.edgetpu_pci == ("/dev/apex_0", "/dev/apex_1") and found.has_edgetpu
    assert found.kinds() == ["edgetpu"]
    assert "Edge TPU on PCIe: /dev/apex_0" in found.summary()


def test_jetson_orin_nano(tmp_path):
    fs = build(tmp_path, {
        "proc/cpuinfo": ORIN_CPUINFO,
        "proc/device-tree/model": b"NVIDIA Jetson Orin Nano Developer Kit\x00",
        "etc/nv_tegra_release": ORIN_RELEASE,
        "sys/devices/platform/17000000.gpu": None,
    })
    found = discover(fs)
    assert found.jetson is not None
    assert (found.jetson.model, found.jetson.l4t, found.jetson.gpu) == ("NVIDIA Jetson Orin Nano Developer Kit", "36.3.0", True)
    assert found.kinds() == ["jetson-gpu"]
    assert (found.cpu.arch, found.cpu.cores) == ("aarch64", 6)
    assert found.cpu.model == "NVIDIA Jetson Orin Nano Developer Kit"  # the device tree beats "ARMv8 Processor"
    assert found.summary() == [
        "Jetson: NVIDIA Jetson Orin Nano Developer Kit, L4T 36.3.0, GPU present",
        "CPU: aarch64, 6 cores, NVIDIA Jetson Orin Nano Developer Kit, features asimd asimddp",
    ]


def test_jetson_known_only_from_the_l4t_release_without_a_visible_gpu(tmp_path):
    fs = build(tmp_path, {"etc/nv_tegra_release": "# R32 (release), REVISION: 7.4, GCID: 33514132, BOARD: t210ref\n"})
    found = discover(fs)
    assert found.jetson is not None and (found.jetson.model, found.jetson.l4t, found.jetson.gpu) == (None, "32.7.4", False)
    assert "Jetson: NVIDIA Jetson (model unknown), L4T 32.7.4, no GPU device node visible" in found.summary()
    assert "No accelerator found: inference runs on the CPU" in found.summary()


def test_x86_laptop(tmp_path):
    fs = build(tmp_path, {"proc/cpuinfo": X86_CPUINFO, "sys/class/dmi/id/product_name": "20KHCTO1WW\n"})
    cpu = discover(fs).cpu
    assert (cpu.arch, cpu.cores) == ("x86_64", 8)
    assert cpu.model == "Intel(R) Core(TM) i7-8550U CPU @ 1.80GHz" and cpu.board == "20KHCTO1WW"
    assert cpu.features == ("avx", "avx2", "fma")
    assert discover(fs).summary()[-1] == (
        "CPU: x86_64, 8 cores, Intel(R) Core(TM) i7-8550U CPU @ 1.80GHz on 20KHCTO1WW, features avx avx2 fma"
    )


def test_32bit_raspberry_pi_os_arch_is_guessed(tmp_path):
    cpuinfo = "processor\t: 0\nmodel name\t: ARMv7 Processor rev 3 (v7l)\nFeatures\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm crc32\nCPU architecture: 7\n"
    cpu = discover(build(tmp_path, {"proc/cpuinfo": cpuinfo})).cpu
    assert (cpu.arch, cpu.cores, cpu.features, cpu.model) == ("armv7l", 1, ("neon",), "ARMv7 Processor rev 3 (v7l)")


def test_empty_tree_is_all_unknown(tmp_path):
    found = discover(Sysfs(str(tmp_path)))
    assert (found.edgetpu_usb, found.edgetpu_pci, found.jetson) == ((), (), None)
    assert (found.cpu.arch, found.cpu.model, found.cpu.cores, found.cpu.features, found.cpu.board) == ("unknown", None, 0, (), None)
    assert found.summary()[-1] == "CPU: unknown, unknown number of cores, no SIMD features listed"


def test_garbage_nodes_never_raise(tmp_path):
    fs = build(tmp_path, {
        "sys/bus/usb/devices/3-1/idVendor": b"\xff\xfe\x00garbage",
        "sys/bus/usb/devices/3-2/idVendor": "1a6e\n",
        "sys/bus/usb/devices/3-2/idProduct": "089a\n",
        "sys/bus/usb/devices/3-2/busnum": "three\n",
        "sys/bus/usb/devices/3-2/speed": "super\n",
        "sys/bus/usb/devices/3-2/devnum": None,  # a directory where a file belongs
        "proc/cpuinfo": b"\x00\x01 not : a : cpuinfo\n\xff\n",
        "proc/device-tree/model": None,
        "etc/nv_tegra_release": "# R (release), REVISION: x\n",
    })
    found = discover(fs)
    (tpu,) = found.edgetpu_usb
    assert (tpu.busnum, tpu.devnum, tpu.speed_mbps) == (None, None, None)
    assert found.jetson is None and found.cpu.board is None and found.cpu.arch == "unknown"
    assert "Edge TPU on USB 3-2: firmware not loaded yet" in found.summary()[0]


def test_a_node_failing_with_eio_is_unknown(tmp_path, mocker):
    fs = build(tmp_path, {"proc/cpuinfo": PI4_CPUINFO, "dev/apex_0": ""})
    mocker.patch.object(fs, "read_text", side_effect=SysfsError("cannot read: Input/output error", "proc/cpuinfo"))
    found = discover(fs)
    assert found.edgetpu_pci == ("/dev/apex_0",) and found.cpu.cores == 0 and found.cpu.model is None


def test_to_dict_is_json_ready(tmp_path):
    fs = build(tmp_path, {"proc/cpuinfo": PI5_CPUINFO, **usb_device("2-1", "1a6e", "089a")})
    link_usb(tmp_path, "2-1")
    data = json.loads(json.dumps(discover(fs).to_dict()))
    assert data["edgetpu_usb"][0]["state"] == "no_firmware" and data["edgetpu_usb"][0]["speed_mbps"] == 5000
    assert data["jetson"] is None and data["cpu"]["features"] == ["asimd", "asimddp"] and data["cpu"]["cores"] == 4


def test_the_configured_root_is_used_by_default(tmp_path, monkeypatch):
    build(tmp_path, {"dev/apex_0": ""})
    monkeypatch.setenv("FIELDNODE_SYSFS_ROOT", str(tmp_path))
    assert discover().edgetpu_pci == ("/dev/apex_0",)


def test_the_live_root_reports_this_machine():
    cpu = discover(Sysfs("/")).cpu
    assert cpu.arch == platform.machine()
    assert cpu.cores >= 1


@pytest.mark.parametrize("release, l4t", [
    ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref", "35.4.1"),
    ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic", "36.4.3"),
])
def test_l4t_release_lines(tmp_path, release, l4t):
    found = discover(build(tmp_path, {"etc/nv_tegra_release": release + "\n"}))
    assert found.jetson is not None and found.jetson.l4t == l4t
