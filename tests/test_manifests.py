"""k8s/ manifests against the KubeRay CRDs, Kubernetes and Prometheus Operator schemas
(offline; gzipped copies in tests/schemas/), and their agreement with deploy/ and docker/."""

import functools
import gzip
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = Path(__file__).resolve().parent / "schemas"
SHARED = ROOT.parent / "shared" / "schemas"  # the project's copy, when checked out beside it
CRDS = {"RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
CORE = {("batch/v1", "CronJob"): "cronjob-batch-v1.json", ("batch/v1", "Job"): "job-batch-v1.json",
        ("v1", "ConfigMap"): "configmap-v1.json", ("v1", "Service"): "service-v1.json",
        ("v1", "ServiceAccount"): "serviceaccount-v1.json", ("apps/v1", "Deployment"): "deployment-apps-v1.json"}
MONITORING = {"PodMonitor": "podmonitor_v1.json", "ServiceMonitor": "servicemonitor_v1.json"}


def manifests() -> list[tuple[str, dict]]:
    out = []
    for path in sorted((ROOT / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((f"{path.name}:{doc['kind']}", doc))
    return out


def read_schema(name: str) -> str:
    return gzip.decompress((SCHEMAS / f"{name}.gz").read_bytes()).decode()


@functools.cache
def crd_schema(kind: str) -> dict:
    # libyaml's loader: the pure-Python one takes ~10 s per KubeRay CRD (they are megabytes)
    crd = yaml.load(read_schema(CRDS[kind]), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def unknown_keys(doc, schema: dict, path: str = "") -> list[str]:
    """Keys the structural schema does not list (CRD schemas allow them; the API server
    would silently prune them, so a typo would be lost without a word)."""
    out = []
    if isinstance(doc, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in doc.items():
            if props is not None and key in props:
                out += unknown_keys(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += unknown_keys(value, extra, f"{path}.{key}")
            elif props is not None and not extra and not schema.get("x-kubernetes-preserve-unknown-fields"):
                out.append(f"{path}.{key}")
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(doc):
            out += unknown_keys(value, schema["items"], f"{path}[{i}]")
    return out


def validate(doc: dict) -> list[str]:
    kind, api = doc["kind"], doc["apiVersion"]
    if kind in CRDS:
        assert api == "ray.io/v1", api
        schema = crd_schema(kind)
        errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
        return errors + [f"unknown key {k}" for k in unknown_keys(doc, schema) if not k.startswith(".metadata")]
    if (api, kind) in CORE:
        schema = json.loads(read_schema(f"k8s-v1.32.2-standalone-strict/{CORE[(api, kind)]}"))
    elif kind in MONITORING:
        assert api == "monitoring.coreos.com/v1", api
        schema = json.loads(read_schema(f"monitoring.coreos.com/{MONITORING[kind]}"))
    else:
        return [f"no schema for {api} {kind}"]
    return [f"{list(e.absolute_path)}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]


ALL = manifests()


def test_vendored_schemas_equal_the_shared_ones():
    names = [str(p.relative_to(SCHEMAS))[:-3] for p in SCHEMAS.rglob("*.gz")]
    assert len(names) == 11
    if not SHARED.is_dir():
        pytest.skip("../shared/schemas is not checked out beside the repository")
    for name in names:
        assert read_schema(name) == (SHARED / name).read_text(), name


@pytest.mark.parametrize("name,doc", ALL, ids=[n for n, _ in ALL])
def test_manifest_matches_its_schema(name, doc):
    assert validate(doc) == []


def test_schema_check_catches_mistakes():
    """The validator is not vacuous: a misspelt field, a wrong type and a missing required
    field are all reported."""
    (doc,) = [d for n, d in ALL if d["kind"] == "RayService"]
    bad = yaml.safe_load(yaml.safe_dump(doc))
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    assert any("rayStartParam" in e for e in validate(bad))
    (cron,) = [d for n, d in ALL if d["kind"] == "CronJob"]
    bad = yaml.safe_load(yaml.safe_dump(cron))
    bad["spec"]["schedule"] = 2
    assert validate(bad)
    del bad["spec"]["schedule"]
    assert any("schedule" in e for e in validate(bad))


def test_every_kind_the_issue_asks_for_is_there():
    kinds = {d["kind"] for _, d in ALL}
    assert {"RayJob", "RayService", "CronJob", "PodMonitor", "ConfigMap"} <= kinds


def test_rayservice_runs_deploy_serve_yaml():
    (svc,) = [d for _, d in ALL if d["kind"] == "RayService"]
    assert yaml.safe_load(svc["spec"]["serveConfigV2"]) == yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())


def test_images_and_ray_version_agree_with_docker_and_constraints():
    ray_pin = re.search(r"^ray==(\S+)", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        base = re.search(r"^FROM (\S+)", (ROOT / "docker" / dockerfile).read_text(), re.M).group(1)
        assert base.startswith(f"rayproject/ray:{ray_pin}-py311"), (dockerfile, base)
    text = "\n".join(p.read_text() for p in (ROOT / "k8s").glob("*.yaml"))
    assert set(re.findall(r'rayVersion: "([^"]+)"', text)) == {ray_pin}
    images = set(re.findall(r"image: (\S+)", text))
    assert images == {"registry.example.com/sidserve:0.1.0", "registry.example.com/sidserve:0.1.0-gpu"}, images


def test_pods_carry_the_podmonitor_label():
    (mon,) = [d for _, d in ALL if d["kind"] == "PodMonitor"]
    want = mon["spec"]["selector"]["matchLabels"]
    for _, doc in ALL:
        for template in find_pod_templates(doc):
            labels = template.get("metadata", {}).get("labels", {})
            assert want.items() <= labels.items(), doc["metadata"]
            ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
            assert mon["spec"]["podMetricsEndpoints"][0]["port"] in ports


def find_pod_templates(doc) -> list[dict]:
    if doc["kind"] not in CRDS:
        return []
    out = []

    def walk(node):
        if isinstance(node, dict):
            if "template" in node and "containers" in node["template"].get("spec", {}):
                out.append(node["template"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc["spec"])
    return out


DOCKER_KEYWORDS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                   "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word, rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_lint(name):
    """No Docker engine here: check what a linter would, and that the install is CI's."""
    ins = dockerfile_instructions(ROOT / "docker" / name)
    assert ins[0][0] == "FROM"
    for word, _ in ins:
        assert word in DOCKER_KEYWORDS and word == word.upper(), word
    ignored = (ROOT / ".dockerignore").read_text().split()
    for word, args in ins:
        if word == "COPY":
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for src in sources:
                assert (ROOT / src).exists(), f"COPY of a missing path {src}"
                assert src not in ignored, f"{src} is copied but .dockerignore excludes it"
    runs = " ".join(args for word, args in ins if word == "RUN")
    make = (ROOT / "Makefile").read_text()
    assert "pip install --quiet -c constraints.txt" in make  # CI's install line ...
    assert "pip install -c constraints.txt ." in runs or "pip install -c constraints.txt '.[gpu]'" in runs  # ... here
    assert ins[-1][0] in {"EXPOSE", "CMD", "ENTRYPOINT", "COPY"}
    assert any(w == "USER" and a == "ray" for w, a in ins), "run as the image's unprivileged ray user"
    assert [w for w, _ in ins].count("WORKDIR") == 1 and ("WORKDIR", "/app") in ins  # k8s entrypoints use /app/jobs


def test_dockerignore_keeps_local_state_out():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "outputs"} <= ignored


def _env_entries(node, keys: set[str], found: dict[str, list]) -> None:
    """Every env entry (name + value/valueFrom) named in ``keys``, anywhere in a manifest."""
    if isinstance(node, dict):
        if node.get("name") in keys and ("value" in node or "valueFrom" in node):
            found.setdefault(node["name"], []).append(node)
        for v in node.values():
            _env_entries(v, keys, found)
    elif isinstance(node, list):
        for v in node:
            _env_entries(v, keys, found)


def test_secrets_come_from_kubernetes_secrets_not_literals():
    """The API key and the Ray token reach the pods through secretKeyRef, never as a value."""
    wanted = {"rayservice.yaml": {"SIDSERVE_API_KEY", "RAY_AUTH_TOKEN"}, "cronjob-refresh.yaml": {"RAY_AUTH_TOKEN"}}
    for name, keys in wanted.items():
        found: dict[str, list] = {}
        for doc in yaml.safe_load_all((ROOT / "k8s" / name).read_text()):
            _env_entries(doc, keys, found)
        assert set(found) == keys, (name, found)
        for entries in found.values():
            for e in entries:
                assert "value" not in e and e["valueFrom"]["secretKeyRef"]["name"] == "sidserve-secrets", e
