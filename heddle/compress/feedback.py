"""Error control: what each rank compresses, and how its buffers move (per layer, per rank).

With g_i this rank's gradient, C the compressor, and sums over ranks written sum_j:

- no feedback:   send C(g_i); the step uses sum_j C(g_j).
- ErrorFeedback (EF14, Seide et al. / Karimireddy et al.): v = g + e; send C(v); e <- v - C(v);
  the step uses sum_j C(v_j).
- EF21 (Richtarik et al. 2021): v = g - h; send C(v); h <- h + C(v); the step uses
  H = sum_j h_j (kept by every rank: H <- H + sum_j C(v_j)).
- EControl (Gao et al., ICLR'24): v = eta e + g - h; send delta = C(v);
  e <- e + g - h - delta; h <- h + delta; the step uses H = sum_j h_j, H <- H + sum_j delta_j.

EF21 and EControl start from h = g_0, e = 0, H = sum_j g_0,j: the first message is sent
uncompressed (``needs_first_message``). With eta = 0 EControl's e never feeds back and it is EF21.
Buffers (``state`` dict per layer): ErrorFeedback e; EF21 h, H; EControl e, h, H, all fp32.
Updates never write into a buffer in place: each assigns a new tensor to the (staged) state dict,
so :class:`~heddle.compress.GradientCompression` can discard a step by keeping the old dict.
"""

from __future__ import annotations

import torch


class NoFeedback:
    needs_first_message = False

    def prepare(self, g: torch.Tensor, state: dict) -> torch.Tensor:
        return g

    def init_local(self, g, state) -> None:
        """First (uncompressed) message: this rank's buffers from g_0."""

    def init_total(self, total, state) -> torch.Tensor:
        """First message: the aggregate buffers from sum_j g_0,j; returns what the step uses."""
        return total

    def update_local(self, g, v, local, state) -> None:
        pass

    def aggregate(self, total, state) -> torch.Tensor:
        return total

    def __repr__(self):
        return "NoFeedback()"


class ErrorFeedback(NoFeedback):
    """EF14: v = g + e, e <- v - C(v)."""

    def prepare(self, g, state):
        e = state.get("e")
        return g if e is None else g + e

    def update_local(self, g, v, local, state):
        state["e"] = v - local

    def __repr__(self):
        return "ErrorFeedback()"


class EF21(NoFeedback):
    """EF21: v = g - h, h <- h + C(v), step with H = sum_j h_j."""

    needs_first_message = True

    def prepare(self, g, state):
        return g - state["h"]

    def init_local(self, g, state):
        state["h"] = g.clone()

    def init_total(self, total, state):
        state["H"] = total.clone()
        return state["H"]

    def update_local(self, g, v, local, state):
        state["h"] = state["h"] + local

    def aggregate(self, total, state):
        state["H"] = state["H"] + total
        return state["H"]

    def __repr__(self):
        return "EF21()"


class EControl(EF21):
    """EControl: v = eta e + g - h; e <- e + g - h - C(v); h <- h + C(v); step with H."""

    def __init__(self, eta: float = 0.05):
        if not isinstance(eta, (int, float)) or not eta >= 0:
            raise ValueError(f"eta={eta!r} must be a number >= 0")
        self.eta = float(eta)

    def prepare(self, g, state):
        return self.eta * state["e"] + g - state["h"]

    def init_local(self, g, state):
        state["e"] = torch.zeros_like(g)
        super().init_local(g, state)

    def update_local(self, g, v, local, state):
        state["e"] = state["e"] + (g - state["h"] - local)
        state["h"] = state["h"] + local

    def __repr__(self):
        return f"EControl(eta={self.eta})"
