"""profiler: always-on per-step timing, device metrics and straggler reports.

``StepProfiler`` records every step of every rank (JSON lines, optionally a Chrome trace,
Prometheus and TensorBoard) and names stragglers across ranks through a ``StatsExchange``
registered by name in ``EXCHANGES``; ``elastic-prof report RUN_DIR`` summarises a run.
Importing this package imports no framework: torch, pynvml, prometheus_client, tensorboard
and matplotlib are loaded when a feature needs them.
"""
from .api import (PHASES, SAMPLED_PHASES, ExchangeSettings, PhaseInterval, RankStats, Sampler, Sink,
                  StatsExchange, StepRecord, StragglerReport)
from .core import PEAK_FLOPS, StepProfiler
from .errors import (ExchangeError, NoRecordsError, ProfilerConfigError, ProfilerError,
                     ProfilerUsageError)
from .exchange import EXCHANGES, detect_stragglers
from .sampler import NvmlSampler, PsutilSampler, create_sampler
from .sinks import ChromeTraceSink, JsonlSink, PrometheusSink, TensorBoardSink

__all__ = [
    "StepProfiler", "StepRecord", "PhaseInterval", "RankStats", "StragglerReport", "PHASES", "SAMPLED_PHASES",
    "PEAK_FLOPS",
    "Sink", "Sampler", "JsonlSink", "ChromeTraceSink", "PrometheusSink", "TensorBoardSink",
    "NvmlSampler", "PsutilSampler", "create_sampler", "detect_stragglers",
    "StatsExchange", "ExchangeSettings", "EXCHANGES",
    "ProfilerError", "ProfilerConfigError", "ProfilerUsageError", "NoRecordsError", "ExchangeError",
]
