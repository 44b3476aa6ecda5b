"""Runtime: the torch.library ops (CPU reference; CUDA kernels register on the same names) and the
linear modules that call them."""
from .modules import FakeQuantLinear, QuantLinear
from .ops import bitplane_mm, cpu_impl, wpaq_linear, wq_linear

__all__ = ["QuantLinear", "FakeQuantLinear", "bitplane_mm", "wpaq_linear", "wq_linear", "cpu_impl"]
