"""Compressed gradient synchronisation: compressors, error control, L-GreCo, DDP hook.

    from heddle.compress import GradientCompression, TopK, EControl, LGreCo
    comp = GradientCompression(TopK(density=0.01), feedback=EControl(eta=0.05), adaptive=LGreCo())
    ddp.register_comm_hook(comp, comp.hook)        # or comp.all_reduce(grads) without DDP
"""

from heddle.compress.compressors import Compressor, Identity, PayloadCompressor, Quantize, RandomK, TopK
from heddle.compress.feedback import EF21, EControl, ErrorFeedback, NoFeedback
from heddle.compress.gradient_compression import GradientCompression
from heddle.compress.lgreco import LGreCo, solve
from heddle.compress.powersgd import PowerSGD

__all__ = ["Compressor", "PayloadCompressor", "Identity", "TopK", "RandomK", "Quantize", "PowerSGD",
           "NoFeedback", "ErrorFeedback", "EF21", "EControl", "LGreCo", "solve", "GradientCompression"]
