"""Analysis of a bound spec: token layouts, tile classes and schedules, runtime tensor extents."""
