"""Block-wise calibration machinery shared by the calibration passes.

block.py   the decoder layer's math written out as a function of its weights (so smoothing, clipping and
           quantization can be trained through it, and attention probabilities are visible for AKL)
inputs.py  calibration ids -> first-layer hidden states and rotary tables
losses.py  DLC, AKL and MSE block losses
"""
from .block import BlockMath, BlockWeights, batched
from .inputs import embed_inputs, rope_tables
from .losses import akl_loss, dlc_loss


def progress(blocks, ctx, desc: str):
    """Blocks with a progress bar when ctx.progress."""
    from tqdm.auto import tqdm
    return tqdm(blocks, desc=desc, disable=not ctx.progress, leave=False)


__all__ = ["BlockMath", "BlockWeights", "batched", "embed_inputs", "rope_tables", "akl_loss", "dlc_loss",
           "progress"]
