"""profiler: always-on per-step timing, device metrics and straggler reports."""
from .errors import ProfilerError

__all__ = ["ProfilerError"]
