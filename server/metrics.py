"""Prometheus metrics (names are a public contract: dashboards and alerts read them).

Request-path metrics (latency histograms, token and request counters) are updated by the server as
events flow. Engine state (running/waiting requests, memory, weight bytes, KV cache, QDEC, kernel path)
is read from the engine at scrape time by `EngineCollector`, so it is never stale.

`REGISTRY` is the registry of the module-level `DEFAULT` instance, which apps use unless given their own
`Metrics()` (tests do, to start from zero); it always carries every name below.
"""
from __future__ import annotations

import importlib
import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from engine.types import STRUCTURED_KINDS

log = logging.getLogger("fbserve.metrics")
# the Engine's optional paths that report `<path>_status()` (/health and fbserve_path_enabled; qdec apart)
ENGINE_PATHS = ("cpu_decode", "cuda_graph", "merged_projections", "prefix_cache")

# No `*_created` series next to every counter and histogram: noise for dashboards (process-wide setting).
disable_created_metrics()

# Seconds. Token latencies on edge GPUs span ~5 ms (decode) to seconds (long prefill on CPU).
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
REQUEST_STATUSES = ("success", "error", "invalid", "cancelled", "rejected")
REJECT_REASONS = ("loading", "queue_full", "timeout", "too_large", "shutting_down")


def process_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; elsewhere the peak RSS)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def kernel_paths(device: str) -> list[dict[str, Any]]:
    """Rows {path, bits, device, ...} of the kernel paths in use, from `engine.quant_linear.kernel_paths()`.

    No quantized layer (or no such module) means dense torch matmuls: one row path="torch-dense".
    Other keys of a row (layers, group sizes, fallback reason) are kept for /health.
    """
    dense = [{"path": "torch-dense", "bits": None, "device": device}]
    try:
        module = importlib.import_module("engine.quant_linear")
        raw: Any = module.kernel_paths()
    except ModuleNotFoundError as exc:
        if exc.name in ("engine.quant_linear", "engine"):
            return dense
        return _unknown_path(device, exc)
    except Exception as exc:  # a scrape or /health must not fail because of it
        return _unknown_path(device, exc)
    if isinstance(raw, dict):
        raw = [{"path": k, **(v if isinstance(v, dict) else {"bits": v})} for k, v in raw.items()]
    rows = [{"device": device, "bits": None, **(item if isinstance(item, dict) else {"path": item})}
            for item in raw or []]
    return rows or dense


_warned: set[str] = set()


def _unknown_path(device: str, exc: Exception) -> list[dict[str, Any]]:
    message = f"{type(exc).__name__}: {exc}"
    if message not in _warned:
        _warned.add(message)
        log.warning("cannot tell the kernel path: engine.quant_linear.kernel_paths() failed: %s", message)
    return [{"path": "unknown", "bits": None, "device": device, "error": message}]


class EngineCollector:
    """Reads engine state at scrape time; every family is exported even before an engine exists."""

    def __init__(self) -> None:
        self.engine_fn: Callable[[], Any] = lambda: None
        self.device = "cpu"

    def describe(self) -> Iterable[Any]:
        return self._families(None)

    def collect(self) -> Iterable[Any]:
        return self._families(self.engine_fn())

    @staticmethod
    def _call(engine: Any, name: str, default: Any) -> Any:
        if engine is None:
            return default
        try:
            return getattr(engine, name)()
        except Exception:
            log.exception("engine.%s() failed during a metrics scrape", name)
            return default

    def _families(self, engine: Any) -> list[Any]:
        stats = self._call(engine, "stats", {})
        running = GaugeMetricFamily("fbserve_requests_running", "Requests being generated (in the batch).")
        running.add_metric([], stats.get("running", 0))
        waiting = GaugeMetricFamily("fbserve_requests_waiting", "Requests queued, waiting for a batch slot.")
        waiting.add_metric([], stats.get("waiting", 0))
        kv_ratio = GaugeMetricFamily("fbserve_kv_cache_usage_ratio", "Fraction of the KV cache in use (0..1).")
        kv_ratio.add_metric([], stats.get("kv_cache_used_ratio", 0.0))

        memory = GaugeMetricFamily("fbserve_memory_bytes", "Memory by device and kind.", labels=["device", "kind"])
        for (device, kind), value in self._memory_rows(engine, stats).items():
            memory.add_metric([device, kind], value)
        weights = GaugeMetricFamily("fbserve_model_weight_bytes", "Model weight bytes by kind.", labels=["kind"])
        for kind, value in self._call(engine, "weight_bytes", {}).items():
            weights.add_metric([kind], value)

        residual = GaugeMetricFamily("fbserve_qdec_residual_bytes", "QDEC residual bytes held in pinned host memory.")
        residual.add_metric([], stats.get("qdec_residual_bytes", 0))
        channels = CounterMetricFamily("fbserve_qdec_channels_fetched", "QDEC residual channels fetched.")
        channels.add_metric([], stats.get("qdec_channels_fetched", 0))
        fetched = CounterMetricFamily("fbserve_qdec_bytes_fetched", "QDEC residual bytes fetched.")
        fetched.add_metric([], stats.get("qdec_bytes_fetched", 0))
        queried = CounterMetricFamily("fbserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        queried.add_metric([], stats.get("prefix_cache_queried_tokens", 0))
        hits = CounterMetricFamily("fbserve_prefix_cache_hits", "Prompt tokens whose keys and values were reused "
                                   "from the prefix cache instead of computed.")
        hits.add_metric([], stats.get("prefix_cache_hit_tokens", 0))

        kernel = GaugeMetricFamily("fbserve_kernel_info", "Kernel path in use (1 per row).",
                                   labels=["path", "bits", "device"])
        if engine is not None:
            for row in kernel_paths(self.device):
                bits = "" if row.get("bits") is None else str(row["bits"])
                kernel.add_metric([str(row.get("path")), bits, str(row.get("device"))], 1)
        bpw = GaugeMetricFamily("fbserve_model_bits_per_weight", "Bits per weight of the served model's linears "
                                "(codes, scales, zeros and low-rank factors; the dtype width when unquantized).",
                                labels=["model", "method"])
        card = self._model_card(engine)
        if card is not None and card.quantization is not None:
            bpw.add_metric([card.id, card.quantization.method], card.quantization.bits_per_weight)
        paths = GaugeMetricFamily("fbserve_path_enabled", "Optional serving paths (qdec, cuda_graph, cpu_decode, "
                                  "merged_projections, prefix_cache): "
                                  "1 when live, 0 with the reason why not.", labels=["path", "reason"])
        for name, status in self._path_status(engine).items():
            paths.add_metric([name, str(status.get("reason") or "")], 1 if status.get("enabled") else 0)
        return [running, waiting, kv_ratio, memory, weights, residual, channels, fetched, queried, hits, kernel,
                bpw, paths]

    def _path_status(self, engine: Any) -> dict[str, dict]:
        """/health's status objects of the optional paths (empty before the model is loaded)."""
        if engine is None:
            return {}
        out = {path: self._call(engine, f"{path}_status", {}) for path in ENGINE_PATHS
               if hasattr(engine, f"{path}_status")}
        if hasattr(engine, "model"):
            from engine import qdec

            try:
                out["qdec"] = qdec.health(engine.model)
            except Exception:
                log.exception("qdec.health failed during a metrics scrape")
        return {k: v for k, v in out.items() if v}

    @staticmethod
    def _model_card(engine: Any) -> Any:
        if engine is None:
            return None
        from server.model_card import model_card

        try:
            return model_card(engine)
        except Exception:
            log.exception("the model card failed during a metrics scrape")
            return None

    def _memory_rows(self, engine: Any, stats: dict) -> dict[tuple[str, str], int]:
        rows: dict[tuple[str, str], int] = {("cpu", "rss"): process_rss_bytes()}
        torch = sys.modules.get("torch")  # never import torch just to scrape
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            rows[("cuda", "allocated")] = torch.cuda.memory_allocated()
            rows[("cuda", "reserved")] = torch.cuda.memory_reserved()
        if engine is not None:
            reported = self._call(engine, "memory_report", {})
            if "kv_cache_bytes" in stats and not any("kv" in kind for _, kind in reported):
                rows[(self.device, "kv_cache_total")] = stats["kv_cache_bytes"]
            rows.update(reported)
        return rows


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(
            "fbserve_time_to_first_token_seconds", "From request arrival to the first generated token.",
            buckets=TOKEN_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "fbserve_inter_token_latency_seconds", "Between consecutive generated tokens of a request.",
            buckets=TOKEN_BUCKETS, registry=r)
        self.request_duration = Histogram(
            "fbserve_request_duration_seconds", "From request arrival to its last byte.",
            buckets=REQUEST_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "fbserve_queue_wait_seconds", "From submission to the engine to the start of prefill.",
            buckets=REQUEST_BUCKETS, registry=r)
        self.prompt_tokens = Counter("fbserve_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("fbserve_generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("fbserve_requests", "API requests by outcome.", ["status"], registry=r)
        self.requests_rejected = Counter("fbserve_requests_rejected", "Requests refused before admission.",
                                         ["reason"], registry=r)
        self.requests_cancelled = Counter("fbserve_requests_cancelled",
                                          "Requests cancelled because the client disconnected.", registry=r)
        self.structured_requests = Counter("fbserve_structured_output_requests",
                                           "API requests whose response_format constrains the output, by format.",
                                           ["format"], registry=r)
        for status in REQUEST_STATUSES:
            self.requests.labels(status=status)
        for reason in REJECT_REASONS:
            self.requests_rejected.labels(reason=reason)
        for fmt in STRUCTURED_KINDS:
            self.structured_requests.labels(format=fmt)
        self.engine_collector = EngineCollector()
        r.register(self.engine_collector)

    def bind_engine(self, engine_fn: Callable[[], Any], device: str) -> None:
        """Read engine state through `engine_fn()` (None while loading) at each scrape."""
        self.engine_collector.engine_fn = engine_fn
        self.engine_collector.device = device

    def enable_vllm_names(self, model_name: Callable[[], str]) -> None:
        """Also export the vLLM names of `VLLM_NAMES` (idempotent)."""
        if getattr(self, "vllm_collector", None) is None:
            self.vllm_collector = VllmCompatCollector(self, model_name)
            self.registry.register(self.vllm_collector)

    def count_request(self, status: str) -> None:
        self.requests.labels(status=status).inc()
        if status == "cancelled":
            self.requests_cancelled.inc()

    def track(self) -> RequestTracker:
        return RequestTracker(self)


class RequestTracker:
    """Latency and token accounting of one API request, which may run several engine requests (n > 1)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.arrival = time.monotonic()
        self.first_token_seen = False
        self.last_token_time: dict[int, float] = {}  # per choice
        self.finished = False
        self.timeout_s: float | None = None  # the request's deadline is arrival + timeout_s
        self.on_finish: Callable[[], None] | None = None  # e.g. release the admission

    def observe(self, index: int, prompt_len: int, first_event: bool, queue_wait_s: float | None,
                n_tokens: int) -> None:
        now = time.monotonic()
        m = self.metrics
        if first_event:
            m.prompt_tokens.inc(prompt_len)
            if queue_wait_s is not None:
                m.queue_wait.observe(queue_wait_s)
        if n_tokens <= 0:
            return
        m.generation_tokens.inc(n_tokens)
        if not self.first_token_seen:
            self.first_token_seen = True
            m.time_to_first_token.observe(now - self.arrival)
        last = self.last_token_time.get(index)
        if last is not None:  # an event with k tokens spreads its gap over them
            for _ in range(n_tokens):
                m.inter_token_latency.observe((now - last) / n_tokens)
        self.last_token_time[index] = now

    def finish(self, status: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.metrics.request_duration.observe(time.monotonic() - self.arrival)
        self.metrics.count_request(status)
        if self.on_finish is not None:
            self.on_finish()


# vLLM's names for our series (`--metrics-compat vllm`), so dashboards built for vLLM work unchanged.
# vLLM's *_perc cache gauges are fractions 0..1 too. Every series gains vLLM's `model_name` label.
VLLM_NAMES: dict[str, tuple[str, ...]] = {
    "fbserve_requests_running": ("vllm:num_requests_running",),
    "fbserve_requests_waiting": ("vllm:num_requests_waiting",),
    "fbserve_kv_cache_usage_ratio": ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"),
    "fbserve_time_to_first_token_seconds": ("vllm:time_to_first_token_seconds",),
    "fbserve_inter_token_latency_seconds": ("vllm:time_per_output_token_seconds", "vllm:inter_token_latency_seconds"),
    "fbserve_request_duration_seconds": ("vllm:e2e_request_latency_seconds",),
    "fbserve_prompt_tokens": ("vllm:prompt_tokens",),
    "fbserve_generation_tokens": ("vllm:generation_tokens",),
    "fbserve_prefix_cache_queries": ("vllm:prefix_cache_queries",),
    "fbserve_prefix_cache_hits": ("vllm:prefix_cache_hits",),
}


class VllmCompatCollector:
    """Re-exports our families under vLLM's names (read from the source collectors at scrape time)."""

    def __init__(self, metrics: Metrics, model_name: Callable[[], str]) -> None:
        self.metrics = metrics
        self.model_name = model_name

    def _sources(self) -> list[Any]:
        m = self.metrics
        return [m.time_to_first_token, m.inter_token_latency, m.request_duration, m.prompt_tokens,
                m.generation_tokens, m.engine_collector]

    def collect(self) -> Iterable[Any]:
        model = self.model_name()
        for source in self._sources():
            for family in source.collect():
                for new_name in VLLM_NAMES.get(family.name, ()):
                    yield _renamed(family, family.name, new_name, model)
        success = CounterMetricFamily("vllm:request_success", "Requests finished successfully.",
                                      labels=["model_name"])
        succeeded = sum(sample.value for family in self.metrics.requests.collect() for sample in family.samples
                        if sample.name.endswith("_total") and sample.labels.get("status") == "success")
        success.add_metric([model], succeeded)
        yield success


def _renamed(family: Any, old: str, new: str, model: str) -> Any:
    out = Metric(new, family.documentation, family.type)
    for sample in family.samples:
        out.add_sample(new + sample.name[len(old):], {**sample.labels, "model_name": model}, sample.value)
    return out


DEFAULT = Metrics()
REGISTRY = DEFAULT.registry
