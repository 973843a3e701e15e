import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).parent.parent / "deploy"
K8S_VERSION = "1.33.0"
KSERVE_SCHEMA = Path(__file__).parent / "fixtures" / "kserve_inferenceservice_v1beta1.schema.json"


def manifests():
    return sorted((DEPLOY / "kubernetes").glob("*.yaml"))


def validate(manifest: dict):
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
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
