"""FlexSP cost model: time and memory of one sequence-parallel group for one micro-batch.

For a group of degree ``d`` (a power of two) holding sequences of lengths ``s_k`` (FlexSP, Sec. 4):

    compute   T_c = (1/d) * sum_k (a1 s_k^2 + a2 s_k) + b1                              (eq. 2)
    all-to-all T_a = a3 * (sum_k s_k / d) * (d-1)/d / v_d + b2        (0 when d == 1)     (eq. 3)
    memory    M   = (sum_k s_k / d) * token_bytes + static_bytes  <=  device_bytes        (eq. 4)

``a1``/``a2`` are seconds of forward+backward of the whole model per token^2 / per token (the
quadratic term is attention), ``a3`` the bytes one token moves through Ulysses' all-to-alls over
the whole model (q, k, v and the output, forward and backward), ``v_d`` the all-to-all bandwidth
per device measured for group size ``d`` (FlexSP's eq. has ``a3 s / (d v_d)``; the explicit
``(d-1)/d`` is the share that leaves the device). ``token_bytes``: activation memory per token.

Constants come from :meth:`CostModel.calibrate` (measured on this machine and model, see
:mod:`heddle.sequence.adaptive.calibrate`) or :meth:`CostModel.preset` (clusters we cannot run
here; every constant's source is in ``PRESETS`` below and in docs/adaptive_sp.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

GB = 1e9

# GPT-7B (LLaMA-2-7B shape: hidden 4096, 32 layers, vocab 32000, 6.7e9 parameters), bf16,
# FlashAttention (no s^2 activations), no activation recomputation, ZeRO-3 over 64 devices.
_H, _L, _PARAMS = 4096, 32, 6.7e9
_DENSE_FLOPS = 6 * _PARAMS                 # fwd+bwd FLOPs per token, dense part (6N rule)
_ATTN_FLOPS = 6 * _H * _L                  # fwd+bwd FLOPs per token^2, causal attention (12hL s^2/2)
_A2A_BYTES = _L * 2 * 4 * _H * 2           # q,k,v,out x fwd+bwd x bf16 per token, all layers
_TOKEN_BYTES = _L * 34 * _H + 2 * 4 * 32000  # 34h bytes/token/layer (Korthikanti'22) + fp32 logits+grad


def _preset(peak_flops: float, mfu: float, bandwidth_gbs: dict[int, float], name: str, notes: str) -> dict:
    eff = peak_flops * mfu
    return dict(name=name, a1=_ATTN_FLOPS / eff, a2=_DENSE_FLOPS / eff, b1=5e-3, a3=float(_A2A_BYTES),
                b2=_L * 4 * 2 * 20e-6, bandwidth={d: v * GB for d, v in bandwidth_gbs.items()},
                token_bytes=float(_TOKEN_BYTES), static_bytes=8 * GB, device_bytes=80 * GB, notes=notes)


# FlexSP's measured all-to-all bandwidth per device on its A100 cluster (GB/s): 2-8 inside a node
# (NVLink), 16-64 across nodes (InfiniBand). 128/256: the 64-GPU value carried over (extrapolated).
_A100_BW = {1: float("inf"), 2: 119.5, 4: 104.1, 8: 96.5, 16: 10.3, 32: 5.9, 64: 4.9, 128: 4.9, 256: 4.9}
# H100: NVLink4 carries 1.5x NVLink3 per direction (450 vs 300 GB/s) and NDR InfiniBand 400 Gb/s
# per GPU ~4x the A100 cluster's per-GPU share: FlexSP's numbers scaled by 1.5 / 4 (estimates).
_H100_BW = {d: (v * 1.5 if d <= 8 else v * 4.0) for d, v in _A100_BW.items()}

PRESETS = {
    "a100-80g-ib": _preset(
        312e12, 0.45, _A100_BW, "a100-80g-ib",
        "GPT-7B on A100-80GB, 8 GPUs/node NVLink, InfiniBand across nodes. a1,a2: FLOPs (6N dense, "
        "6hL s^2 causal attention) at 45% of the 312 TFLOP/s bf16 peak; a3: Ulysses q,k,v,out bf16 "
        "fwd+bwd; v_d: FlexSP (ASPLOS'25) measured all-to-all bandwidth; token_bytes: 34h/layer "
        "(Korthikanti et al. 2022, FlashAttention) + logits; static: ZeRO-3 states + buffers."),
    "h100-80g-ib": _preset(
        989e12, 0.40, _H100_BW, "h100-80g-ib",
        "GPT-7B on H100-80GB SXM, 8 GPUs/node NVLink4, NDR InfiniBand. a1,a2 at 40% of the 989 "
        "TFLOP/s bf16 peak; v_d: FlexSP's A100 numbers x1.5 inside a node, x4 across nodes "
        "(link-rate ratios, not a measurement); memory as a100-80g-ib."),
}


def min_degree_for(length: int, capacity: int) -> int:
    """Smallest power of two d with ``length <= d * capacity`` (FlexSP: 2^ceil(log2(ceil(s/cap))))."""
    need = max(1, -(-int(length) // int(capacity)))
    return 1 << (need - 1).bit_length()


@dataclass
class CostModel:
    """Time (seconds) and memory (bytes) of a sequence-parallel group; see the module docstring."""

    a1: float
    a2: float
    b1: float
    a3: float
    b2: float
    bandwidth: dict[int, float]
    token_bytes: float
    static_bytes: float
    device_bytes: float
    name: str = "custom"
    notes: str = ""
    measured: dict = field(default_factory=dict)  # calibration samples and fit errors

    def __post_init__(self):
        self.bandwidth = {int(d): float(v) for d, v in self.bandwidth.items()}
        for name in ("a1", "a2", "b1", "a3", "b2", "token_bytes", "static_bytes"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"CostModel.{name}={value!r} must be a finite number >= 0")
        if self.token_bytes <= 0:
            raise ValueError(f"CostModel.token_bytes={self.token_bytes} must be positive")
        if not self.device_bytes > self.static_bytes:
            raise ValueError(f"CostModel.device_bytes={self.device_bytes} must exceed static_bytes="
                             f"{self.static_bytes}: no room for activations")
        for d, v in self.bandwidth.items():
            if d < 1 or d & (d - 1) or not v > 0:
                raise ValueError(f"CostModel.bandwidth[{d}]={v}: keys must be powers of two, values > 0 (bytes/s)")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "CostModel":
        if name not in PRESETS:
            raise ValueError(f"unknown cost-model preset {name!r}; valid: {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    def to_dict(self) -> dict:
        out = asdict(self)
        out["bandwidth"] = {str(d): (v if math.isfinite(v) else "inf") for d, v in self.bandwidth.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "CostModel":
        data = dict(data)
        data["bandwidth"] = {int(d): float(v) for d, v in data["bandwidth"].items()}
        return cls(**data)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "CostModel":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def calibrate(cls, model, group_pool, **kwargs) -> "CostModel":
        """Measure the constants on this machine; see :func:`heddle.sequence.adaptive.calibrate.calibrate`."""
        from heddle.sequence.adaptive.calibrate import calibrate

        return calibrate(model, group_pool, **kwargs)

    # -- the model -----------------------------------------------------------------------------
    @property
    def token_capacity(self) -> int:
        """Tokens one device holds for activations: (device - static) / token_bytes."""
        return int((self.device_bytes - self.static_bytes) // self.token_bytes)

    def bandwidth_for(self, degree: int) -> float:
        if degree == 1:
            return float("inf")
        if degree not in self.bandwidth:
            raise ValueError(f"no all-to-all bandwidth for group size {degree} in cost model {self.name!r}; "
                             f"known sizes: {sorted(self.bandwidth)}")
        return self.bandwidth[degree]

    def max_degree(self) -> int:
        return max(self.bandwidth) if self.bandwidth else 1

    def work(self, length: float, degree: int) -> float:
        """Per-sequence seconds on a group of ``degree`` (compute + all-to-all, no fixed overheads)."""
        t = (self.a1 * length * length + self.a2 * length) / degree
        if degree > 1:
            t += self.a3 * length / degree * (degree - 1) / degree / self.bandwidth_for(degree)
        return t

    def overhead(self, degree: int) -> float:
        """Fixed seconds per group per micro-batch: b1 (+ b2 for the all-to-all when degree > 1)."""
        return self.b1 + (self.b2 if degree > 1 else 0.0)

    def group_time(self, lengths, degree: int) -> float:
        """T_c + T_a of one group (eqs. 2-3); 0 for an empty group."""
        lengths = list(lengths)
        if not lengths:
            return 0.0
        return sum(self.work(s, degree) for s in lengths) + self.overhead(degree)

    def comm_time(self, lengths, degree: int) -> float:
        if degree == 1 or not lengths:
            return 0.0
        total = float(sum(lengths))
        return self.a3 * total / degree * (degree - 1) / degree / self.bandwidth_for(degree) + self.b2

    def memory(self, lengths, degree: int) -> float:
        """Bytes per device (eq. 4)."""
        return sum(lengths) / degree * self.token_bytes + self.static_bytes

    def fits(self, total_tokens: float, degree: int) -> bool:
        return total_tokens <= degree * self.token_capacity

    def min_degree(self, length: int, num_devices: int | None = None) -> int:
        """Smallest power of two d with length <= d * token_capacity (FlexSP's 2^ceil(log2(ceil(s/cap))))."""
        cap = self.token_capacity
        if cap < 1:
            raise ValueError(f"cost model {self.name!r} leaves no memory for a single token")
        d = min_degree_for(length, cap)
        need = max(1, math.ceil(length / cap))
        if num_devices is not None and d > num_devices:
            raise ValueError(f"a sequence of {length} tokens needs {need} devices' memory (capacity "
                             f"{cap} tokens/device, cost model {self.name!r}) but only num_devices="
                             f"{num_devices} are available")
        return d
