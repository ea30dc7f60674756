"""Model FLOPs and the peak table behind model FLOPs utilisation (MFU).

MFU, as torchtitan and PaLM define it (PaLM, Appendix B):

    MFU = flops_per_token * tokens_per_second_per_device / peak_flops_per_device

    flops_per_token = 6 * N + 12 * L * H * Q * T

N: parameters without the embedding table (each takes 2 FLOPs per multiply-add in the forward
and 4 in the backward); L layers, H heads, Q head dim, T sequence length: the attention scores and
the weighted sum (the second term; causal masking is not discounted, as in PaLM and torchtitan).

Peaks are dense (no 2:4 sparsity) tensor-core figures from the vendors' data sheets, in FLOP/s.
A device not in the table has no MFU unless the user gives ``--peak-tflops``.
"""

from __future__ import annotations

# (substring of torch.cuda.get_device_name, dtype) -> dense peak FLOP/s. Longest match wins, so
# "H100 PCIe" beats "H100".
PEAK_FLOPS: dict[tuple[str, str], float] = {
    ("A100", "bf16"): 312e12, ("A100", "fp16"): 312e12, ("A100", "tf32"): 156e12, ("A100", "fp32"): 19.5e12,
    ("H100", "bf16"): 989e12, ("H100", "fp16"): 989e12, ("H100", "tf32"): 494e12, ("H100", "fp32"): 67e12,
    ("H100 PCIe", "bf16"): 756e12, ("H100 PCIe", "fp16"): 756e12, ("H100 PCIe", "tf32"): 378e12,
    ("H100 PCIe", "fp32"): 51e12,
    ("H100 NVL", "bf16"): 835e12, ("H100 NVL", "fp16"): 835e12, ("H100 NVL", "tf32"): 418e12,
    ("H100 NVL", "fp32"): 60e12,
    ("H200", "bf16"): 989e12, ("H200", "fp16"): 989e12, ("H200", "tf32"): 494e12, ("H200", "fp32"): 67e12,
}
DTYPES = ("bf16", "fp16", "tf32", "fp32")


def peak_flops(device_name: str, dtype: str = "bf16") -> float | None:
    """Dense peak FLOP/s of ``device_name`` for ``dtype``; None when the device is not in the table."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: valid {', '.join(DTYPES)}")
    matches = [(len(key), value) for (key, dt), value in PEAK_FLOPS.items()
               if dt == dtype and key.lower() in device_name.lower()]
    return max(matches)[1] if matches else None


def gpt_flops_per_token(*, params_no_embedding: int, n_layers: int, n_heads: int, head_dim: int,
                        seq_len: int) -> float:
    """6 N + 12 L H Q T: training FLOPs per token (forward and backward)."""
    for name, value in (("params_no_embedding", params_no_embedding), ("n_layers", n_layers),
                        ("n_heads", n_heads), ("head_dim", head_dim), ("seq_len", seq_len)):
        if value < 0:
            raise ValueError(f"{name}={value} must be >= 0")
    return 6.0 * params_no_embedding + 12.0 * n_layers * n_heads * head_dim * seq_len


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] (None without a known peak)."""
    if peak is None:
        return None
    if not peak > 0:
        raise ValueError(f"peak={peak} FLOP/s must be positive")
    return flops_per_token * tokens_per_s_per_device / peak
