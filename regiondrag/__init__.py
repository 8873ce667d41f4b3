"""regiondrag: a compiled inference engine for RegionDrag (ECCV 2024) region-based drag editing."""
from .drags import PointPairs, PolygonPairs, RegionPairs, RegionPoints

__all__ = ["RegionPairs", "PolygonPairs", "RegionPoints", "PointPairs"]
__version__ = "0.1.0"
