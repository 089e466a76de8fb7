"""The compose file is valid against the Compose spec and its commands are real tgq commands."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.cli import _parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_matches_the_compose_spec():
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).with_name("check-jsonschema"))
    result = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_services_wait_for_a_healthy_redis_and_workers_scale():
    services = _compose()["services"]
    assert services["redis"]["healthcheck"]["test"][-1] == "ping"
    for name in ("api", "worker", "worker-gpu"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    # `--scale worker=N` needs no fixed container name and no host port on the worker.
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]


@pytest.mark.parametrize("service", ["api", "worker", "worker-gpu"])
def test_service_commands_parse_with_the_tgq_cli(service):
    args = _parser().parse_args(_compose()["services"][service]["command"])
    assert args.command in ("api", "worker")
