"""Peak FLOP/s of known accelerators, for MFU.

Dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity). A part not listed here
gets no MFU unless `monitor.peak_flops` is set: a wrong denominator is worse than none.
"""

from __future__ import annotations

PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "V100": 125e12,  # fp16: V100 has no bf16
    "MI300X": 1307e12,
}


def peak_flops_for(device_name: str) -> float:
    """Best match by the longest table key contained in the device name; 0.0 when unknown."""
    upper = device_name.upper()
    matches = [k for k in PEAK_BF16_FLOPS if k.upper() in upper]
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else 0.0
