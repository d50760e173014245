"""ONNX export of dynamic models that keeps their per-sample decisions, and its check.

The public entry is ``dynconvert.export_onnx`` (``convert/export_model.py``), which asks the
model's strategy for its export graph; this package exports and checks a given graph.
"""

from dynconvert.export.check import check_onnx
from dynconvert.export.onnx_export import export_dynamic_onnx, export_static_onnx

__all__ = ["check_onnx", "export_dynamic_onnx", "export_static_onnx"]
