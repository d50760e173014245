"""What SkipNet and BlockDrop share as strategies: the hooks that only read or set the
decisions of a :class:`BlockSkipModel` (one offset per block on its keep-logits)."""

from __future__ import annotations

import torch

from dynconvert.runtime.block_skip import BlockSkipModel
from dynconvert.strategies import block_skip_common as common
from dynconvert.strategies.base import Strategy
from dynconvert.strategies.block_skip_graph import BlockSkipGraph

# an offset no keep-logit overcomes: the gate always opens (or, negated, always closes)
OPEN = 1e4


class BlockSkipStrategy(Strategy):
    """Base of the strategies whose model is a :class:`BlockSkipModel`."""

    def sweep_on_split(self, dyn: BlockSkipModel, split, prep, recipe, sweep: list[dict]) -> list[dict]:
        return common.sweep_points_on_split(dyn, split, prep, recipe, sweep)

    def open_all_(self, dyn: BlockSkipModel) -> BlockSkipModel:
        """Every block kept."""
        dyn.dyn.bias.fill_(OPEN)
        return dyn

    def take_all_(self, dyn: BlockSkipModel) -> BlockSkipModel:
        """Every droppable block skipped."""
        dyn.dyn.bias.fill_(-OPEN)
        return dyn

    def mixed_(self, dyn: BlockSkipModel) -> BlockSkipModel:
        """Every other block kept."""
        dyn.dyn.bias.copy_(torch.tensor([OPEN if i % 2 == 0 else -OPEN for i in range(dyn.num_blocks)]))
        return dyn

    def export_graph(self, dyn: BlockSkipModel, example: torch.Tensor, form: str | None = None):
        """Blocks as ``If`` branches (``cond``, the default measured faster in onnxruntime) or gathers."""
        return BlockSkipGraph(dyn, example, form or "cond").eval()
