"""The precision policy: float32 unless the user asks for less, and never a slow emulation.

Every forward pass vlbench runs (world pretraining, defense training, attacks, evaluation)
takes its precision from one setting, ``precision: fp32|bf16|fp16`` in a matrix config or
``--precision`` on the command line, default ``fp32``:

- ``fp32``: plain float32, everywhere, on every device.
- ``bf16`` / ``fp16``: the forward pass runs under :func:`torch.autocast` with that dtype;
  weights, optimiser state and every result stay float32. On CUDA, ``fp16`` training scales
  the loss (:class:`torch.amp.GradScaler`). On a CPU, the dtype is accepted only where the
  hardware computes it natively (bf16: AVX512-BF16 or AMX; fp16: AVX512-FP16 or AMX-FP16):
  elsewhere oneDNN emulates it, measured at 16× slower than float32 on the world model, so
  the request is refused with a one-line error instead of silently taking hours.

The precision is part of the identity of everything it touches: cell ids, cached defense
checkpoints, the world model's checkpoint and the embedding cache.
"""

from __future__ import annotations

import contextlib
import os

from vlbench.errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT = "fp32"


def dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _device_type(device) -> str:
    import torch

    return torch.device(device).type


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_native(precision: str) -> bool:
    """Whether this CPU, as PyTorch will drive it, computes ``precision`` natively.

    Both the hardware (its instruction set) and the kernels PyTorch selected count: a CPU
    with AVX512-BF16 run with ``ATEN_CPU_CAPABILITY=avx2`` or ``ONEDNN_MAX_CPU_ISA=AVX2``
    emulates bf16 like an AVX2-only one.
    """
    import torch

    if precision == "fp32":
        return True
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        return False
    try:  # what oneDNN, which runs the convolutions and matmuls, will actually use
        onednn = {"bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported,
                  "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported}[precision]()
    except (AttributeError, RuntimeError):
        onednn = True
    flags = _cpu_flags()
    hardware = {"bf16": {"avx512_bf16", "amx_bf16"}, "fp16": {"avx512_fp16", "amx_fp16"}}[precision]
    return onednn and bool(flags & hardware)


def check_precision(precision: str, device="cpu") -> str:
    """``precision`` if it can run fast on ``device``; else a one-line :class:`UserError`."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    import torch

    kind = _device_type(device)
    if precision == "fp32":
        return precision
    if kind == "cuda":
        if precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise UserError("precision bf16 needs a GPU with bfloat16 support (Ampere or newer)",
                            "use --precision fp16 or fp32")
        return precision
    if kind != "cpu":
        raise UserError(f"precision {precision} is not supported on device {device}", "use --precision fp32")
    if not cpu_native(precision):
        capability = torch.backends.cpu.get_cpu_capability()
        forced = [v for v in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA") if os.environ.get(v)]
        how = f" as configured by {', '.join(forced)}" if forced else ""
        raise UserError(f"precision {precision} is not native on this CPU ({capability}{how}): PyTorch would "
                        "emulate it, some 16x slower than float32",
                        "use --precision fp32 (the default), or a CPU with "
                        f"{'AVX512-BF16 or AMX' if precision == 'bf16' else 'AVX512-FP16 or AMX-FP16'}, or a GPU")
    return precision


def autocast(precision: str, device="cpu"):
    """The context a forward pass runs in: autocast to the precision's dtype, or nothing."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(_device_type(device), dtype=dtype(precision))


def grad_scaler(precision: str, device="cpu"):
    """A loss scaler for fp16 training (bf16 and fp32 need none), else None. fp16 training
    on a CPU is refused by :func:`check_precision` unless the CPU computes it natively; the
    scaler works there too, which is how its code path is tested."""
    import torch

    if precision == "fp16":
        return torch.amp.GradScaler(_device_type(device))
    return None


def fused_optimizer_kwargs(device="cpu") -> dict:
    """``fused=True`` where the installed PyTorch has fused Adam/AdamW kernels for the device
    (CPU since 2.4): one pass over each parameter instead of a dozen elementwise ops."""
    import torch

    kind = _device_type(device)
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    if kind == "cuda" or (kind == "cpu" and (major, minor) >= (2, 4)):
        return {"fused": True}
    return {}
