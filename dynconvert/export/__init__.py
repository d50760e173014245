"""ONNX export of dynamic models that keeps their per-sample decisions, and its check."""

from dynconvert.export.check import check_onnx
from dynconvert.export.onnx_export import export_onnx, export_static_onnx

__all__ = ["check_onnx", "export_onnx", "export_static_onnx"]
