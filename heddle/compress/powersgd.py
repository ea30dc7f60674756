"""PowerSGD (Vogels et al. 2019): rank-r approximation by one warm-started power iteration.

For a layer reshaped to M [n, m] (first dim x the rest) with rank r (capped at min(n, m)):

    P   = M Q                       [n, r]   Q [m, r]: last step's Q (warm start), else shared random
    P^  = orth(sum_ranks P)         all-reduce #1, then reduced QR (identical input -> identical P^)
    Q_i = M^T P^                    [m, r]
    Q   = sum_ranks Q_i             all-reduce #2
    C(M_i) = P^ Q_i^T   (local),    sum_i C(M_i) = P^ Q^T   (aggregated)

Payload: 32 r (n + m) bits per layer, summable (all-reduced). Layers where r (n + m) >= n m, and
1-D layers, go uncompressed (32 bits per element). L-GreCo's error for rank r is the exact SVD
tail sum_{i > r} sigma_i^2 (the best rank-r error; one power iteration does no better).
"""

from __future__ import annotations

import torch

import heddle.dist as hd
from heddle.compress.compressors import Compressor, _numel
from heddle.compress.exchange import Exchange


def _matrix_shape(shape) -> tuple[int, int] | None:
    if len(shape) < 2:
        return None
    return int(shape[0]), _numel(shape[1:])


class PowerSGD(Compressor):
    family = "powersgd"
    summable = True
    two_phase = True

    def __init__(self, rank: int = 4):
        self.check_param(rank)
        self.rank = rank

    @property
    def default_param(self):
        return self.rank

    def candidates(self):
        """floor(r/2) .. 2r, as L-GreCo's public code (gamma = 0.5, beta = 2)."""
        return list(range(max(1, self.rank // 2), 2 * self.rank + 1))

    def check_param(self, param):
        if not isinstance(param, int) or isinstance(param, bool) or param < 1:
            raise ValueError(f"rank={param!r} must be an int >= 1")

    def compresses(self, shape, param=None) -> bool:
        nm = _matrix_shape(shape)
        if nm is None:
            return False
        n, m = nm
        r = min(self.rank if param is None else param, n, m)
        return r * (n + m) < n * m

    def bits_per_element(self, shape, param=None):
        if not self.compresses(shape, param):
            return 32.0
        n, m = _matrix_shape(shape)
        r = min(self.rank if param is None else param, n, m)
        return 32.0 * r * (n + m) / (n * m)

    def expected_error(self, x, param):
        if not self.compresses(x.shape, param):
            return 0.0
        n, m = _matrix_shape(x.shape)
        s = torch.linalg.svdvals(x.reshape(n, m).double())
        return float(s[min(param, n, m):].pow(2).sum())

    def start_exchange(self, items, group=None) -> "PowerSGDExchange":
        return PowerSGDExchange(self, items, group).start()

    def exchange(self, items, group=None) -> None:
        """Both phases for a list of compressible layers, blocking (see the module docstring)."""
        if items:
            ex = self.start_exchange(items, group)
            ex.advance()
            ex.finish()

    def __repr__(self):
        return f"PowerSGD(rank={self.rank})"


class PowerSGDExchange(Exchange):
    """PowerSGD's two phases in flight: ``start`` issues sum P (async), ``advance`` waits for it,
    orthogonalises and issues sum Q (the data dependence), ``finish`` forms P^ Q^T."""

    phases = 2

    def start(self):
        self.mats, qs = [], []
        for it in self.items:
            n, m = _matrix_shape(it.x.shape)
            r = min(it.param, n, m)
            q = it.state.get("q")
            if q is None or tuple(q.shape) != (m, r):
                g = torch.Generator().manual_seed(it.shared_seed)
                q = torch.randn(m, r, generator=g, dtype=torch.float32).to(it.x.device)
            self.mats.append(it.x.reshape(n, m))
            qs.append(q)
        self.ps = [mat @ q for mat, q in zip(self.mats, qs)]
        self.flat = torch.cat([p.reshape(-1) for p in self.ps])
        if self.world > 1:
            self.work = hd.all_reduce(self.flat, group=self.group, async_op=True)
        self.phase = 1
        return self

    def advance(self):
        self.wait()
        self.work = None
        self.p_hats = [torch.linalg.qr(seg.view_as(p), mode="reduced").Q
                       for seg, p in zip(torch.split(self.flat, [p.numel() for p in self.ps]), self.ps)]
        self.q_locals = [mat.t() @ p_hat for mat, p_hat in zip(self.mats, self.p_hats)]
        self.flat_q = torch.cat([q.reshape(-1) for q in self.q_locals])
        if self.world > 1:
            self.work = hd.all_reduce(self.flat_q, group=self.group, async_op=True)
        self.phase = 2

    def finish(self):
        self.wait()
        for it, p_hat, q_loc, seg in zip(self.items, self.p_hats, self.q_locals,
                                         torch.split(self.flat_q, [q.numel() for q in self.q_locals])):
            q_sum = seg.view_as(q_loc)
            it.local = (p_hat @ q_loc.t()).view_as(it.x)
            it.total = (p_hat @ q_sum.t()).view_as(it.x)
            it.state["q"] = q_sum.clone()
            it.payload_bytes = 4 * (p_hat.numel() + q_loc.numel())
