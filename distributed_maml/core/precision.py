"""scaling.precision: the arithmetic a meta-gradient is computed in.

- "fp32": exact float32. On a GPU, TF32 is switched off: PyTorch lets cuDNN convolutions run
  in TF32 by default (Ampere and newer), ~1e-3 relative error per op, and a second-order conv4
  meta-gradient then differed from the CPU's by up to 3% (measured on an H100).
- "tf32": TF32 matmuls and convolutions on the GPU (10-bit mantissa inputs, float32
  accumulation); a CPU has no TF32 and computes fp32.
- "bf16": the forward and backward ops under torch.autocast(bfloat16) on either device; the
  weights, their gradients and Adam stay float32.

The error each mode puts into the meta-gradient is measured against fp32 by `bench --precision`.
"""

from __future__ import annotations

import contextlib

import torch


def configure(precision: str, device: torch.device) -> None:
    """Sets the process-wide TF32 switches for `precision` on a CUDA device (one setting per
    process: a worker, or the driver computing in-process)."""
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a meta-gradient or a curve is computed in: autocast to bfloat16 for "bf16",
    nothing otherwise. Autocast's cast cache is off: it keys on leaf tensors, and a CUDA graph
    must not hold casts made before its capture."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()
