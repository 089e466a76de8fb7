"""The Grafana dashboard, its provisioning, the Prometheus config and compose's monitoring profile.

Every metric the dashboard queries is exported by the job it selects (API or worker); the PromQL parses
and, run by Prometheus's own engine (`promtool test rules`), combines replicas without double counting.
promtool comes from Debian's prometheus package (scripts/setup.sh installs it)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from api.core.metrics import Metrics
from api.core.timing import Timing
from common.cli import _parser
from common.settings import LimitSettings
from worker.metrics import EngineMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "tgq.json"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
COMPOSE = ROOT / "docker-compose.yml"
JOBS = ("tgq-api", "tgq-worker")
SELECTOR = re.compile(r'\b((?:tgi|tgq)_[a-z0-9_]+)\{([^}]*)\}')

def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing (scripts/setup.sh installs Debian's prometheus)"
    return path


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _targets() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _dashboard()["panels"] for t in p["targets"]]


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# -- what the dashboard queries is exported ------------------------------------------------------------

def _api_names(redis_url: str) -> set[str]:
    """Sample names an API replica exports once traffic has been seen, serving two models (its
    cluster-wide families read from a real Redis holding a waiting job, a worker's batch and the
    batch hash)."""
    import redis

    from common import protocol

    client = redis.Redis.from_url(redis_url)
    client.rpush("q1", "a")
    client.set(protocol.worker_batch_key("m1", "w1"), 3)
    client.hset(protocol.batch_metrics_key("m1"), "inference_count:decode", 2)
    m = Metrics(LimitSettings())
    m.request_count.inc()
    m.failure("validation")
    m.validated(3, 10, 1)
    m.succeeded(Timing(start=100.0, enqueued=100.001, batched=100.01, end=100.2), 4)
    text = m.scrape(client, [("m1", "q1"), ("m2", "q2")]).decode()
    client.close()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def _worker_names() -> set[str]:
    from prometheus_client import generate_latest

    m = EngineMetrics(max_batch_size=4, model="m1")
    m.set_current_size(2)
    m.observe_next_size(2)
    m.observe_inference("prefill", 0.05, True)
    m.observe_inference("decode", 0.01, True)
    text = generate_latest(m.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_metric_the_dashboard_queries_is_exported_by_the_job_it_selects(redis_url):
    exported = {"tgq-api": _api_names(redis_url), "tgq-worker": _worker_names()}
    seen = set()
    for title, expr in _targets():
        names = re.findall(r"\b((?:tgi|tgq)_[a-z0-9_]+)", expr)
        selectors = SELECTOR.findall(expr)
        assert len(selectors) == len(names), f"{title}: every metric needs a job selector: {expr}"
        for name, matchers in selectors:
            job = re.search(r'job="([^"]+)"', matchers)
            assert job and job.group(1) in JOBS, f"{title}: {name} selects no known job"
            assert name in exported[job.group(1)], f"{title}: {job.group(1)} does not export {name}"
            seen.add((job.group(1), name))
    # the worker-side batch families come from workers only: the API's cluster-wide copies are never queried
    for name in ("tgi_batch_current_size", "tgi_batch_inference_count", "tgi_batch_inference_duration_bucket"):
        assert ("tgq-api", name) not in seen


def test_panels_follow_tgis_dashboard():
    dash = _dashboard()
    titles = [p["title"] for p in dash["panels"]]
    for wanted in ("Queue size", "Time to first token", "Inter-token latency", "Throughput", "Batch size",
                   "Failures by err", "Workers per model"):
        assert wanted in titles
    assert len(set(titles)) == len(titles) and len({p["id"] for p in dash["panels"]}) == len(titles)
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == datasource["uid"] and p["targets"]
        assert all(t["datasource"]["uid"] == datasource["uid"] for t in p["targets"])
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
    assert datasource["url"] == "http://prometheus:9090"


# -- Prometheus config and compose -----------------------------------------------------------------------

def test_prometheus_scrapes_the_api_and_every_worker_under_the_dashboards_job_names():
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == set(JOBS)
    services = _compose()["services"]
    api_port = int(services["api"]["environment"]["TGQ_PORT"])
    api_sd = jobs["tgq-api"]["dns_sd_configs"][0]
    assert api_sd["names"] == ["api"] and api_sd["port"] == api_port
    worker_sd = jobs["tgq-worker"]["dns_sd_configs"][0]
    assert set(worker_sd["names"]) == {"worker", "worker-gpu"}
    for name in worker_sd["names"]:
        args = _parser().parse_args(services[name]["command"])
        assert args.metrics_port == worker_sd["port"], name


def test_monitoring_profile_adds_prometheus_and_grafana_only():
    compose = _compose()
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for mount in services[name]["volumes"]:
            source = mount.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), mount
            else:
                assert source in compose["volumes"], mount
    assert "profiles" not in services["api"] and "profiles" not in services["worker"]
    prom_mounts = dict(m.split(":")[:2] for m in services["prometheus"]["volumes"])
    config_flag = next(a for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    assert prom_mounts["./deploy/prometheus/prometheus.yml"] == config_flag.split("=", 1)[1]
    grafana_mounts = dict(m.split(":")[:2] for m in services["grafana"]["volumes"])
    assert grafana_mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "tgq.yml").read_text())["providers"][0]
    assert grafana_mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]


def test_promtool_accepts_the_prometheus_config():
    result = subprocess.run([promtool(), "check", "config", str(PROMETHEUS)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "5m")


def test_promtool_parses_every_panel_query(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"panel_{i}", "expr": _grafana_to_promql(expr)} for i, (_, expr) in enumerate(_targets())]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _expr(title: str, ref: int = 0) -> str:
    return _grafana_to_promql([e for t, e in _targets() if t == title][ref])


def test_prometheus_evaluates_the_panels_without_double_counting(tmp_path):
    """Two API replicas (each repeating the cluster-wide gauges) and two workers, as Prometheus's engine
    sees them: gauges the replicas repeat count once, per-process counters and worker families add up."""
    api = ['job="tgq-api",instance="api-1:3000"', 'job="tgq-api",instance="api-2:3000"']
    wk = ['job="tgq-worker",instance="w-1:9100"', 'job="tgq-worker",instance="w-2:9100"']
    series = []
    for a in api:
        series += [(f"tgi_queue_size{{{a}}}", "3x10"),
                   (f"tgi_batch_current_size{{{a}}}", "7x10"),  # the cluster-wide copy every replica repeats
                   (f"tgi_request_count{{{a}}}", "0+60x10"),  # 1/s on each replica
                   (f'tgi_request_failure{{err="validation",{a}}}', "0+30x10")]
    for w, size in zip(wk, (2, 5)):
        series += [(f"tgi_batch_current_size{{{w}}}", f"{size}x10"),
                   (f'tgq_worker_info{{model="m1",{w}}}', "1x10")]
    two_models = [(f'tgq_model_queue_size{{model="{m}",{a}}}', f"{n}x10") for a in api for m, n in (("m1", 3), ("m2", 1))]
    t = "5m"
    cases = [
        {"input_series": [{"series": s, "values": v} for s, v in series],
         "promql_expr_test": [
             {"expr": _expr("Queue size"), "eval_time": t, "exp_samples": [{"labels": "{}", "value": 3}]},
             {"expr": _expr("Batch size"), "eval_time": t, "exp_samples": [{"labels": '{model="m1"}', "value": 7}]},
             {"expr": _expr("Workers per model"), "eval_time": t,
              "exp_samples": [{"labels": '{model="m1"}', "value": 2}]},
             {"expr": _expr("Requests"), "eval_time": t, "exp_samples": [{"labels": "{}", "value": 2}]},
             {"expr": _expr("Failures by err"), "eval_time": t,
              "exp_samples": [{"labels": '{err="validation"}', "value": 1}]},
         ]},
        {"input_series": [{"series": s, "values": v} for s, v in series + two_models],
         "promql_expr_test": [
             {"expr": _expr("Queue size"), "eval_time": t,
              "exp_samples": [{"labels": '{model="m1"}', "value": 3}, {"labels": '{model="m2"}', "value": 1}]},
         ]},
    ]
    path = tmp_path / "test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "1m",
                                    "tests": [{"interval": "1m", **c} for c in cases]}))
    result = subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
