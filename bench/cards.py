"""What a card can do: its datasheet bf16 peak, told apart by name, and two measured ceilings.

MFU needs a peak, and "H100" is three cards: the SXM part (torch calls it "NVIDIA H100
80GB HBM3") does 989 dense bf16 TFLOP/s, the PCIe part 756 and the NVL part 835. The
table below matches the name torch.cuda.get_device_name returns, most specific entry
first. A card that is not in it gets no datasheet figure rather than a guess.

Datasheets are leads, not what a program reaches, so the benches also measure two
ceilings and report against them too: a large bf16 matrix product (the achievable
matmul rate) and a device-to-device copy (bytes read + bytes written per second; a
decode step that reads every weight once cannot beat weight bytes / this bandwidth).
"""
from __future__ import annotations

import time
from typing import Optional

import torch

# (substring of the device name, dense bf16 TFLOP/s); the first match wins
DATASHEET_BF16_TFLOPS = (
    ("GH200", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),      # "NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 ..."
    ("A100", 312.0),
)


def datasheet_bf16_tflops(name: str) -> Optional[float]:
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_tflops(device: torch.device, n: int = 8192, dtype=torch.bfloat16,
                          reps: int = 20, trials: int = 3) -> float:
    """Best rate of an n x n x n product over a few trials (random data, never zeros:
    zeros run faster than real data on some cards)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):  # a shared machine only ever makes a trial slower
        _sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return best / 1e12


def measure_copy_tbps(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy, counting bytes read plus bytes written, in TB/s."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - t) / 1e12
