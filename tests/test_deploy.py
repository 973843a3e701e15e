import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from serving.common.settings import Settings

DEPLOY = Path(__file__).parent.parent / "deploy"
K8S_VERSION = "1.33.0"
KSERVE_SCHEMA = Path(__file__).parent / "fixtures" / "kserve_inferenceservice_v1beta1.schema.json"


def manifests():
    return sorted((DEPLOY / "kubernetes").rglob("*.yaml"))  # cpu/ included


def validate(manifest: dict):
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", manifests(), ids=lambda p: str(p.relative_to(DEPLOY / "kubernetes")))
def test_kubernetes_manifests_validate_against_the_schemas(path):
    for manifest in yaml.safe_load_all(path.read_text()):
        validate(manifest)


def test_the_kserve_predictor_containers_validate_as_a_pod_spec():
    service = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice.yaml").read_text())
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    predictor = service["spec"]["predictor"]
    validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"},
              "spec": {"containers": predictor["containers"]}})
    (container,) = predictor["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_inferenceservice_validates_against_kserves_schema_with_a_canary_and_a_logger():
    """spec.predictor against KServe's v1beta1 InferenceService schema: minReplicas, canaryTrafficPercent
    (a percentage: KServe's webhook checks it, not its schema), a logger of every request and
    response; a misspelled field or a wrong type is refused."""
    schema = json.loads(KSERVE_SCHEMA.read_text())
    service = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice.yaml").read_text())
    jsonschema.validate(service, schema)
    predictor = service["spec"]["predictor"]
    assert 0 < predictor["canaryTrafficPercent"] < 100 and predictor["minReplicas"] <= predictor["maxReplicas"]
    assert predictor["logger"]["mode"] == "all" and predictor["logger"]["url"].startswith("http")
    for broken in ({"canaryTrafficPercnt": 10}, {"canaryTrafficPercent": "10%"}, {"logger": {"mode": "everything"}},
                   {"logger": {"url": 7}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**service, "spec": {"predictor": {**predictor, **broken}}}, schema)


@pytest.mark.parametrize("name", ["inferenceservice.yaml", "inferenceservice-cpu.yaml"])
def test_every_inferenceservice_validates_against_kserves_schema(name):
    jsonschema.validate(yaml.safe_load((DEPLOY / "kserve" / name).read_text()), json.loads(KSERVE_SCHEMA.read_text()))


def pod_specs() -> dict[str, dict]:
    """Every shipped pod spec: the Deployments' templates and the KServe predictors (a pod spec inline)."""
    specs = {str(p.relative_to(DEPLOY)): m["spec"]["template"]["spec"] for p in manifests()
             for m in yaml.safe_load_all(p.read_text()) if m and m["kind"] == "Deployment"}
    return specs | {f"kserve/{p.name}": yaml.safe_load(p.read_text())["spec"]["predictor"]
                    for p in (DEPLOY / "kserve").glob("*.yaml")}


@pytest.mark.parametrize("name", sorted(pod_specs()))
def test_every_pod_waits_for_the_whole_drain_before_it_is_killed(name):
    """After SIGTERM the server serves, refuses, then answers what it accepted
    (RNNSERVE_DRAIN_SERVE_S + RNNSERVE_DRAIN_S + RNNSERVE_SHUTDOWN_GRACE_S, as the pod sets them or by
    default); Kubernetes kills it terminationGracePeriodSeconds after the SIGTERM (30 s unless set)."""
    spec = pod_specs()[name]
    (container,) = [c for c in spec["containers"] if c["name"] in ("rnnserve", "kserve-container")]
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    settings = Settings(**{k: env.get(f"RNNSERVE_{k.upper()}", getattr(Settings(), k))
                           for k in ("drain_serve_s", "drain_s", "shutdown_grace_s")})
    drain = settings.drain_serve_s + settings.drain_s + settings.shutdown_grace_s
    assert spec.get("terminationGracePeriodSeconds", 30) > drain, (name, drain)


def test_the_validator_rejects_a_broken_manifest():
    deployment = yaml.safe_load((DEPLOY / "kubernetes" / "deployment.yaml").read_text())
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    deployment = yaml.safe_load((DEPLOY / "kubernetes" / "deployment.yaml").read_text())
    deployment["spec"]["replicaz"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


def test_the_deployment_requests_a_gpu_and_probes_v2_health():
    deployment = yaml.safe_load((DEPLOY / "kubernetes" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_the_dockerfile_is_clean_under_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    done = subprocess.run([str(hadolint), str(DEPLOY.parent / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_every_replica_reads_one_state_key_from_an_optional_secret():
    """Sessions go on on any replica only if every replica signs state tokens with the same key:
    one Secret for the Deployment and the KServe predictor; without it each keeps state locally."""
    deployment = yaml.safe_load((DEPLOY / "kubernetes" / "deployment.yaml").read_text())
    service = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice.yaml").read_text())
    pods = (deployment["spec"]["template"]["spec"], service["spec"]["predictor"])
    for container in (pod["containers"][0] for pod in pods):
        (key,) = [e for e in container["env"] if e["name"] == "RNNSERVE_STATE_KEY"]
        assert key["valueFrom"]["secretKeyRef"] == {"name": "rnnserve-state", "key": "key", "optional": True}


def test_the_cpu_manifests_run_the_cpu_image_as_the_gpu_ones_run_the_gpu_image():
    """For CPU nodes, kubernetes/cpu/deployment.yaml and kserve/inferenceservice-cpu.yaml: the CPU
    image, no GPU asked for, the CPU provider named; otherwise the GPU manifests' pod (same name,
    labels, probes, drain, secrets), so the Service and the autoscaler apply to either."""
    gpu = yaml.safe_load((DEPLOY / "kubernetes" / "deployment.yaml").read_text())
    cpu = yaml.safe_load((DEPLOY / "kubernetes" / "cpu" / "deployment.yaml").read_text())
    service = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice-cpu.yaml").read_text())
    validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"},
              "spec": {"containers": service["spec"]["predictor"]["containers"]}})
    assert cpu["metadata"] == gpu["metadata"] and cpu["spec"]["selector"] == gpu["spec"]["selector"]
    (container,) = cpu["spec"]["template"]["spec"]["containers"]
    (predictor,) = service["spec"]["predictor"]["containers"]
    (gpu_container,) = gpu["spec"]["template"]["spec"]["containers"]
    for c in (container, predictor):
        assert c["image"] == "rnnserve:cpu"
        assert not any("nvidia.com/gpu" in r for r in c["resources"].values())
        env = {e["name"]: e for e in c["env"]}
        assert env["RNNSERVE_PROVIDERS"]["value"] == '["CPUExecutionProvider"]'
        assert env["RNNSERVE_STATE_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "rnnserve-state"
        assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    same = ("ports", "lifecycle", "readinessProbe", "livenessProbe", "startupProbe")
    assert {k: container.get(k) for k in same} == {k: gpu_container.get(k) for k in same}
    sized = {"RNNSERVE_PROVIDERS", "RNNSERVE_ENGINES", "RNNSERVE_WORKERS"}  # what a CPU pod sets its own way
    assert [e for e in container["env"] if e["name"] not in sized] == \
        [e for e in gpu_container["env"] if e["name"] not in sized]
    pod, gpu_pod = cpu["spec"]["template"], gpu["spec"]["template"]
    assert pod["metadata"] == gpu_pod["metadata"]
    assert {k: v for k, v in pod["spec"].items() if k != "containers"} == \
        {k: v for k, v in gpu_pod["spec"].items() if k != "containers"}
