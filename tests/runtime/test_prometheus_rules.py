"""`edgepack alerts --prometheus-rules`: the rules file parses, names the SLA of the store's strictest agent, passes
`promtool check rules`, and fires on exactly the devices whose series break a threshold (`promtool test rules`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepack.runtime.alerts_command import alerts_command
from edgepack.runtime.prometheus_rules import GENERATION_ROUTES, Thresholds, rules, rules_yaml
from edgepack.runtime.server import GENERATION_ROUTES as SERVED_GENERATION_ROUTES

yaml = pytest.importorskip("yaml")
PROMTOOL = os.environ.get("PROMTOOL") or shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not found (Debian package: prometheus)")
ALERTS = ["EdgepackLatencyP99OverSLA", "EdgepackErrorRate", "EdgepackCPUHigh", "EdgepackMemoryHigh",
          "EdgepackCacheHitRateLow", "EdgepackShadowAgreementUnderTier"]


def _alerts(*args: str) -> tuple[str, str]:
    result = CliRunner().invoke(alerts_command, ["--prometheus-rules", *args])
    assert result.exit_code == 0, result.output
    return result.stdout, result.stderr


def test_the_rules_file_parses_back_with_every_alert_and_its_threshold():
    text, told = _alerts("-", "--latency-sla-ms", "800")
    doc = yaml.safe_load(text)
    assert doc == rules(Thresholds(800))
    [group] = doc["groups"]
    assert [r["alert"] for r in group["rules"]] == ALERTS
    expr = {r["alert"]: r["expr"] for r in group["rules"]}
    assert "> 1.2\n" in expr["EdgepackLatencyP99OverSLA"]  # 150% of 800 ms, in seconds
    assert "> 0.01\n" in expr["EdgepackErrorRate"]
    assert expr["EdgepackCPUHigh"] == "min_over_time(edgepack_system_cpu_percent[5m]) > 90"
    assert "> 0.4\n" in expr["EdgepackCacheHitRateLow"]  # misses above 40%: hits under 60%
    assert ">= 200" in expr["EdgepackShadowAgreementUnderTier"]
    assert "wrote 6 alerting rules to standard output" in told


def test_the_output_is_deterministic_and_follows_the_flags(tmp_path):
    out = tmp_path / "edgepack.rules.yml"
    _alerts(str(out), "--error-rate", "0.05", "--resource-percent", "80", "--cache-hit-rate", "0.9",
            "--window", "10m", "--sustained", "15m")
    assert out.read_text() == rules_yaml(Thresholds(error_rate=0.05, resource_percent=80, cache_hit_rate=0.9,
                                                    window="10m", sustained="15m"))
    expr = {r["alert"]: r["expr"] for r in yaml.safe_load(out.read_text())["groups"][0]["rules"]}
    assert "EdgepackLatencyP99OverSLA" not in expr  # no SLA given
    assert "> 0.1\n" in expr["EdgepackCacheHitRateLow"] and "[10m]" in expr["EdgepackErrorRate"]
    assert expr["EdgepackMemoryHigh"] == "min_over_time(edgepack_system_memory_percent[15m]) > 80"


def test_bad_thresholds_are_refused_with_the_flag_named():
    result = CliRunner().invoke(alerts_command, ["--prometheus-rules", "-", "--sustained", "5 minutes"])
    assert result.exit_code != 0 and "--sustained: expected a Prometheus duration" in str(result.exception)


def test_the_sla_is_the_strictest_agents_of_the_current_release(tmp_path):
    store = _store(tmp_path, [{"name": "planner", "model": "m", "latency_sla_ms": 2000},
                              {"name": "router", "model": "m", "latency_sla_ms": 400},
                              {"name": "chat", "model": "m"}])
    rule = _latency_rule(_alerts("-", "--store", str(store))[0])
    assert "> 0.6\n" in rule["expr"]
    assert "400 ms SLA of agent router, the strictest" in rule["annotations"]["description"]
    # an agent without its own SLA takes the flag's
    rule = _latency_rule(_alerts("-", "--store", str(store), "--latency-sla-ms", "300")[0])
    assert "> 0.45\n" in rule["expr"] and "of agent chat" in rule["annotations"]["description"]


def test_the_routes_are_the_servers_generation_routes():
    assert set(GENERATION_ROUTES) == SERVED_GENERATION_ROUTES


@needs_promtool
def test_promtool_accepts_the_rules(tmp_path):
    path = tmp_path / "edgepack.rules.yml"
    path.write_text(rules_yaml(Thresholds(800, "planner")))
    check = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0 and "SUCCESS: 6 rules found" in check.stdout, check.stdout + check.stderr


@needs_promtool
def test_promtool_fires_each_alert_on_the_breaking_device_only(tmp_path):
    """Two devices (instance pi breaks every threshold, instance ok stays within them), ten minutes of series."""
    doc = rules(Thresholds(800, "planner"))
    for rule in doc["groups"][0]["rules"]:
        del rule["annotations"]  # promtool compares annotations too; the rendered texts are not under test here
    (tmp_path / "rules.yml").write_text(json.dumps(doc))  # JSON is YAML
    route = '/v1/chat/completions'

    def series(name: str, labels: dict[str, str], values: str, instance: str) -> dict[str, str]:
        body = ",".join(f'{k}="{v}"' for k, v in {**labels, "job": "edgepack", "instance": instance}.items())
        return {"series": f"{name}{{{body}}}", "values": values}

    def histogram(instance: str, slow: bool) -> list[dict[str, str]]:
        # 10 requests a minute, all in (2 s, 4 s] when slow, else all under 0.5 s
        return [series("edgepack_request_duration_seconds_bucket", {"endpoint": route, "le": le},
                       "0+0x10" if slow and le in ("0.5", "1", "2") else "0+10x10", instance)
                for le in ("0.5", "1", "2", "4", "+Inf")] + [
            series("edgepack_request_duration_seconds_count", {"endpoint": route}, "0+10x10", instance)]

    inputs = [
        *histogram("pi", slow=True), *histogram("ok", slow=False),
        # 2 failures in 102 requests a minute (1.96%) against 1 in 201 (0.5%); /health errors do not count
        series("edgepack_requests_total", {"endpoint": route, "status": "200"}, "0+100x10", "pi"),
        series("edgepack_requests_total", {"endpoint": route, "status": "500"}, "0+2x10", "pi"),
        series("edgepack_requests_total", {"endpoint": route, "status": "200"}, "0+200x10", "ok"),
        series("edgepack_requests_total", {"endpoint": route, "status": "429"}, "0+1x10", "ok"),
        series("edgepack_requests_total", {"endpoint": "/health", "status": "500"}, "0+100x10", "ok"),
        # CPU above 90% throughout, against a dip two minutes ago; memory never above
        series("edgepack_system_cpu_percent", {}, "95x10", "pi"),
        series("edgepack_system_cpu_percent", {}, "95x7 50 95 95", "ok"),
        series("edgepack_system_memory_percent", {}, "93x10", "pi"),
        series("edgepack_system_memory_percent", {}, "60x10", "ok"),
        # pi never hits its cache (no hit series at all); ok hits 90%
        series("edgepack_cache_requests_total", {"result": "miss"}, "0+10x10", "pi"),
        series("edgepack_cache_requests_total", {"result": "miss"}, "0+1x10", "ok"),
        series("edgepack_cache_requests_total", {"result": "l1"}, "0+9x10", "ok"),
        # planner: 90% agreement over 300 decisions (under general's 98%); chat within; fresh: too few decisions
        *[series(name, {"agent": agent}, values, "pi") for agent, ratio, agree, disagree in
          (("planner", "0.9", 270, 30), ("chat", "0.99", 297, 3), ("fresh", "0.5", 50, 50))
          for name, values in (("edgepack_shadow_agreement_ratio", f"{ratio}x10"),
                               ("edgepack_shadow_tier_limit", "0.02x10"))],
        *[series("edgepack_shadow_requests_total", {"agent": agent, "result": result}, f"{count}x10", "pi")
          for agent, result, count in (("planner", "agree", 270), ("planner", "disagree", 30),
                                       ("chat", "agree", 297), ("chat", "disagree", 3), ("fresh", "agree", 50),
                                       ("fresh", "disagree", 50))],
    ]
    fired = {"EdgepackLatencyP99OverSLA": "critical", "EdgepackErrorRate": "critical", "EdgepackCPUHigh": "warning",
             "EdgepackMemoryHigh": "warning", "EdgepackCacheHitRateLow": "warning"}
    checks = [{"eval_time": "10m", "alertname": alert,
               "exp_alerts": [{"exp_labels": {"severity": severity, "job": "edgepack", "instance": "pi"}}]}
              for alert, severity in fired.items()]
    checks.append({"eval_time": "10m", "alertname": "EdgepackShadowAgreementUnderTier", "exp_alerts": [
        {"exp_labels": {"severity": "warning", "job": "edgepack", "instance": "pi", "agent": "planner"}}]})
    tests = {"rule_files": ["rules.yml"], "evaluation_interval": "1m",
             "tests": [{"interval": "1m", "input_series": inputs, "alert_rule_test": checks}]}
    (tmp_path / "tests.yml").write_text(json.dumps(tests))
    run = subprocess.run([PROMTOOL, "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def _latency_rule(text: str) -> dict:
    return next(r for r in yaml.safe_load(text)["groups"][0]["rules"] if r["alert"] == "EdgepackLatencyP99OverSLA")


def _store(tmp_path: Path, agents: list[dict]) -> Path:
    """A store whose current release is a manifest only (the command reads nothing else)."""
    digest = "sha256-" + "ab" * 32
    manifest = {"format_version": 1, "name": "demo", "bundle_version": 1, "created": "2025-01-01T00:00:00Z",
                "builder": "test", "llama_cpp_version": "b0", "board": "rpi5", "agents": agents,
                "models": [{"name": "m", "architecture": "llama", "parameters": 1, "file_type": "Q4_K_M",
                            "quant_types": {}, "segments": [digest], "chat_template": None}],
                "blobs": {digest: {"size": 1, "zsize": 1}}}
    store = tmp_path / "store"
    (store / "releases" / "r1").mkdir(parents=True)
    (store / "releases" / "r1" / "manifest.json").write_text(json.dumps(manifest))
    (store / "current").symlink_to("releases/r1")
    return store
