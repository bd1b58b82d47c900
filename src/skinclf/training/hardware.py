"""Device and numeric-precision choices, resolved once at the start of a run and logged."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

from skinclf.errors import SkinclfError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, option: str = "device=") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error. Errors spell
    the setting as the user typed it: ``option`` is ``device=`` for train, ``--device `` for predict."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SkinclfError(
                f"{option}{name}: no CUDA GPU is available here; use {option}cpu or {option}auto"
            )
        try:
            device = torch.device(name)
        except RuntimeError:
            device = None
        if device is None or device.type != "cuda":
            raise SkinclfError(f"{option}{name}: expected cuda or cuda:N")
        count = torch.cuda.device_count()
        # An index past the last GPU would fail only when the first tensor moves there.
        if device.index is not None and device.index >= count:
            raise SkinclfError(f"{option}{name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
        return device
    raise SkinclfError(f"{option}{name}: expected auto, cpu, cuda or cuda:N")


# Resident uint8 splits may take at most this share of the GPU's free memory; the rest is for
# the model, its activations and the optimizer state.
DATA_SHARE_OF_FREE_GPU_MEMORY = 0.25


def data_fits_on_device(data_bytes: int, free_bytes: int) -> bool:
    """Whether splits of ``data_bytes`` may live on a device with ``free_bytes`` free."""
    return data_bytes <= DATA_SHARE_OF_FREE_GPU_MEMORY * free_bytes


@lru_cache
def _cpuinfo() -> str:
    """/proc/cpuinfo's text; empty where there is none (macOS, Windows)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX-512 BF16 or AMX, where bf16 matmuls/convs run natively and fast."""
    return any(flag in _cpuinfo() for flag in ("avx512_bf16", "amx_bf16"))


def describe_machine(device: torch.device) -> str:
    """What a measurement ran on, for a run's recorded environment (skinclf.training.environment) and
    the benchmark scripts' tables: the GPU on CUDA, else the CPU model (from /proc/cpuinfo where
    there is one) and torch's thread count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    threads = torch.get_num_threads()
    return f"{cpu_model()}, {threads} thread{'s' if threads != 1 else ''}"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one; on ARM, which names none there,
    its implementer and part numbers)."""
    fields: dict[str, str] = {}
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if fields.get("model name"):
        return fields["model name"]
    machine = platform.processor() or platform.machine()
    if "CPU implementer" in fields and "CPU part" in fields:
        return f"{machine} (implementer {fields['CPU implementer']}, part {fields['CPU part']})"
    return machine


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the hardware runs it natively, fp32 elsewhere."""
    if name not in PRECISIONS:
        raise SkinclfError(f"trainer.precision={name}: expected one of {', '.join(PRECISIONS)}")
    if name != "auto":
        return name
    return "bf16" if runs_natively("bf16", device) else "fp32"


def runs_natively(precision: str, device: torch.device) -> bool:
    """Whether ``device`` has the hardware for ``precision``: bf16 as :func:`resolve_precision`
    judges it, fp16 on CUDA and on CPUs with AVX-512 FP16 or AMX FP16 (others emulate it)."""
    if precision == "bf16":
        return cuda_has_native_bf16(device) if device.type == "cuda" else cpu_has_native_bf16()
    if precision == "fp16":
        return device.type == "cuda" or any(flag in _cpuinfo() for flag in ("avx512_fp16", "amx_fp16"))
    return True


def cuda_has_native_bf16(device: torch.device) -> bool:
    """True on the GPU ``device`` if it runs bf16 natively: compute capability 8.0 (Ampere) or
    later, or any ROCm GPU, as ``torch.cuda.is_bf16_supported(including_emulation=False)`` judges
    the current GPU. Its default (emulation included) also says yes on a T4 or V100, where bf16
    is emulated and slower than fp32."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device) >= (8, 0)


def input_dtype(precision: str) -> torch.dtype:
    """The dtype batches are fed in: the autocast dtype, so the model never casts its input."""
    return _DTYPES[precision]


def autocast(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the forward-pass context: a no-op for fp32, ``torch.autocast`` otherwise."""
    if precision == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=_DTYPES[precision])
