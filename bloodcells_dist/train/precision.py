"""Mixed precision chosen for the hardware: what `mixed_precision: auto` means, and why, in one line.

    CUDA: bf16 where the GPU supports it, else fp16 (Accelerate adds loss scaling).
    CPU:  bf16 only where the CPU computes it natively (AMX or AVX512-BF16), else fp32: emulated bf16
          autocast ran 5-7x slower than fp32 on an AVX2-only CPU (issue 11).
A launch config asking for fp16 or bf16 (`accelerate launch --mixed_precision ...`) wins over the hardware.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..output import warn

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bf16 dot products


@dataclass(frozen=True)
class Hardware:
    """The facts precision depends on; read from the machine by `detect_hardware`, stubbed in tests."""

    cuda: bool
    cuda_bf16: bool  # the GPU runs bf16 natively (Ampere or newer)
    cpu_native_bf16: bool
    cpu_detail: str  # what the CPU check saw, for the start summary


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags the kernel reports (empty where the file does not exist)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.partition(":")[2].split())
    return set()


def detect_hardware(*, cpuinfo: Path = Path("/proc/cpuinfo"), capability: str | None = None,
                    cuda: bool | None = None) -> Hardware:
    """What this machine offers: a CUDA GPU and its bf16 support, and the CPU's native bf16 (its flags, and
    torch's kernels for it: AVX512 or better). The arguments stand in for the machine in tests."""
    capability = capability or torch.backends.cpu.get_cpu_capability()  # e.g. DEFAULT, AVX2, AVX512, ZVECTOR
    native = sorted(set(NATIVE_BF16_FLAGS) & cpu_flags(cpuinfo))
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return Hardware(cuda=cuda, cuda_bf16=cuda and torch.cuda.is_bf16_supported(including_emulation=False),
                    cpu_native_bf16=bool(native) and capability.startswith("AVX512"),
                    cpu_detail=f"{capability}, {'+'.join(native) if native else 'no AMX/AVX512-BF16'}")


def launch_precision() -> str:
    """What `accelerate launch` (its config or flag) asked for; "no" also when nothing was asked."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()


def resolve_precision(requested: str, hardware: Hardware, launched: str = "no") -> tuple[str, str]:
    """(precision for Accelerate, why) for a config value auto | no | fp16 | bf16."""
    if requested != "auto":
        if requested == "bf16" and not hardware.cuda and not hardware.cpu_native_bf16:
            return "bf16", "set in the config; emulated on this CPU, slow"
        return requested, "set in the config"
    if launched in ("fp16", "bf16"):
        return launched, "auto: the launch config asks for it"
    if hardware.cuda:
        if hardware.cuda_bf16:
            return "bf16", "auto: the GPU supports bf16"
        return "fp16", "auto: the GPU has no bf16, fp16 with loss scaling"
    if hardware.cpu_native_bf16:
        return "bf16", f"auto: the CPU has native bf16 ({hardware.cpu_detail})"
    return "no", f"auto: the CPU has no native bf16 ({hardware.cpu_detail}), fp32"


def warn_if_emulated(precision: str, hardware: Hardware) -> None:
    """One warning where bf16 was asked for on a CPU that can only emulate it."""
    if precision == "bf16" and not hardware.cuda and not hardware.cpu_native_bf16:
        warn(f"mixed_precision bf16 on a CPU without native bf16 ({hardware.cpu_detail}) is emulated and several "
             "times slower than fp32: set mixed_precision auto (or no)")
