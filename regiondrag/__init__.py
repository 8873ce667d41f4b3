"""regiondrag: a compiled inference engine for RegionDrag (ECCV 2024) region-based drag editing.

Public API (see README.md): :class:`RegionDragPipeline`, :class:`EditResult`, the drag types
:class:`RegionPairs`, :class:`PolygonPairs`, :class:`RegionPoints`, :class:`PointPairs`, and
:func:`load_case` / :class:`DragCase` for DragBench cases.
"""
from .data import DragCase, load_case
from .drags import PointPairs, PolygonPairs, RegionPairs, RegionPoints
from .models import ModelLoadError
from .pipeline import EditResult, RegionDragPipeline

__all__ = ["RegionDragPipeline", "EditResult", "RegionPairs", "PolygonPairs", "RegionPoints", "PointPairs",
           "load_case", "DragCase", "ModelLoadError"]
__version__ = "0.1.0"
