"""The Kubernetes manifests render offline (`kubectl kustomize`) and validate against the
Kubernetes schemas (kubernetes-validate) and, for KEDA's ScaledObject, a schema written from its
documented fields; the queue each ScaledObject watches is the one the API enqueues on."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from rq import Queue

from common import protocol

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"



def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing (scripts/setup.sh installs Debian's kubernetes-client)"
    done = subprocess.run([kubectl, "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_every_resource_is_valid(overlay: str) -> None:
    docs = render(overlay)
    keda = json.loads((K8S / "schemas" / "keda-scaledobject.json").read_text())
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Deployment", "Deployment", "Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim",
                     "ScaledObject", "Service", "Service"]
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(doc, keda)
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_scaled_objects_watch_the_queue_the_api_fills_and_target_a_worker() -> None:
    docs = render("base")
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    scaled = [d for d in docs if d["kind"] == "ScaledObject"]
    assert scaled
    for obj in scaled:
        target = deployments[obj["spec"]["scaleTargetRef"]["name"]]
        env = {e["name"]: e["value"] for e in target["spec"]["template"]["spec"]["containers"][0]["env"]}
        queue_key = Queue.redis_queue_namespace_prefix + protocol.queue_name(env["TGQ_MODEL"])  # RQ's list
        assert [t["metadata"]["listName"] for t in obj["spec"]["triggers"]] == [queue_key]


def test_the_gpu_variant_asks_for_a_gpu() -> None:
    (worker,) = [d for d in render("gpu") if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("tgq-worker")]
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and "cuda" in container["args"]


def test_the_keda_schema_refuses_a_broken_scaled_object() -> None:
    keda = json.loads((K8S / "schemas" / "keda-scaledobject.json").read_text())
    (obj,) = [d for d in render("base") if d["kind"] == "ScaledObject"]
    del obj["spec"]["triggers"][0]["metadata"]["listName"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(obj, keda)
