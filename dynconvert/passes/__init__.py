"""torch.fx passes and the graph analyses they rely on: GraphModule in, GraphModule out."""

from dynconvert.passes.analysis import CutPoint, find_cut_points
from dynconvert.passes.exits import exit_points_of, insert_exit_heads
from dynconvert.passes.segments import extract_segment, split_at

__all__ = [
    "CutPoint",
    "exit_points_of",
    "extract_segment",
    "find_cut_points",
    "insert_exit_heads",
    "split_at",
]
