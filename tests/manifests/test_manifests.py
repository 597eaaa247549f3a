"""Every manifest in manifests/ validates against the KubeRay CRD's openAPIV3Schema, and the raymoe
config it embeds validates against `raymoe.config`. Broken copies must fail."""

import copy
import functools
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from raymoe.config import parse_config
from raymoe.errors import ConfigError

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
KUBERAY = SHARED / "kuberay"
MANIFESTS = sorted((ROOT / "manifests").glob("*.yaml"))
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
CONFIG_MOUNT = "/etc/raymoe"

needs_shared = pytest.mark.skipif(not KUBERAY.is_dir(), reason="../shared absent")


# ----- the schema, as the API server would apply it ---------------------------------------------
def k8s_schema(schema):
    """Turn `x-kubernetes-int-or-string` into an int-or-string anyOf, everywhere."""
    if isinstance(schema, list):
        return [k8s_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: k8s_schema(v) for k, v in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def apply_defaults(instance, schema):
    """Fill schema `default:`s into a copy of `instance` (objects and array items, recursively)."""
    if isinstance(instance, dict) and schema.get("type") == "object":
        out = dict(instance)
        for name, sub in schema.get("properties", {}).items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = apply_defaults(out[name], sub)
        return out
    if isinstance(instance, list) and "items" in schema:
        return [apply_defaults(item, schema["items"]) for item in instance]
    return instance


@functools.cache
def crd_schema(kind: str) -> dict:
    crd = yaml.load((KUBERAY / CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return k8s_schema(version["schema"]["openAPIV3Schema"])


def validate_resource(doc: dict) -> None:
    """Raise jsonschema.ValidationError if `doc` does not fit its CRD."""
    schema = crd_schema(doc["kind"])
    jsonschema.Draft7Validator(schema).validate(apply_defaults(doc, schema))


# ----- what a manifest holds ---------------------------------------------------------------------
def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def ray_resource(docs: list[dict]) -> dict:
    (resource,) = [d for d in docs if d.get("kind") in CRD_FILES]
    return resource


def embedded_config(docs: list[dict]) -> dict:
    (config_map,) = [d for d in docs if d.get("kind") == "ConfigMap"]
    return yaml.safe_load(config_map["data"]["config.yaml"])


def pod_specs(resource: dict) -> list[dict]:
    cluster = resource["spec"].get("rayClusterConfig", resource["spec"])
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [g["template"]["spec"] for g in groups]


def test_manifests_exist():
    assert {p.name for p in MANIFESTS} >= {"rayservice-cpu-demo.yaml", "rayservice-gpu-heterogeneous.yaml",
                                           "raycluster-bench.yaml"}  # fmt: skip


@needs_shared
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_crd(path):
    validate_resource(ray_resource(load_docs(path)))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_embedded_config_validates(path):
    docs = load_docs(path)
    parse_config(embedded_config(docs), f"{path.name} ConfigMap")
    config_map_name = next(d for d in docs if d["kind"] == "ConfigMap")["metadata"]["name"]
    head = pod_specs(ray_resource(docs))[0]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v.get("configMap", {}).get("name") for v in head["volumes"]}
    assert any(volumes.get(n) == config_map_name and p == CONFIG_MOUNT for n, p in mounts.items())


@pytest.mark.parametrize("path", [p for p in MANIFESTS if p.name.startswith("rayservice")], ids=lambda p: p.name)
def test_serve_config_points_at_the_app_and_config(path):
    serve_config = yaml.safe_load(ray_resource(load_docs(path))["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "raymoe.serve.app:app_builder"
    assert app["args"]["config_path"] == f"{CONFIG_MOUNT}/config.yaml"
    import importlib

    module, name = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), name))


def test_gpu_groups_are_heterogeneous():
    docs = load_docs(Path(ROOT / "manifests" / "rayservice-gpu-heterogeneous.yaml"))
    groups = ray_resource(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    selectors = {g["template"]["spec"]["nodeSelector"]["cloud.google.com/gke-accelerator"] for g in groups}
    assert len(selectors) == len(groups) == 3
    resources = [yaml.safe_load(yaml.safe_load(g["rayStartParams"]["resources"])) for g in groups]
    assert all("raymoe_speed" in r for r in resources)
    assert len({r["raymoe_speed"] for r in resources}) == 3


@needs_shared
def test_kuberay_samples_validate():
    """The validator itself: KubeRay's own samples pass it."""
    for path in sorted(KUBERAY.glob("ray-service.*.yaml")):
        validate_resource(ray_resource(load_docs(path)))


def _break(doc: dict, how: str) -> dict:
    doc = copy.deepcopy(doc)
    cluster = doc["spec"].get("rayClusterConfig", doc["spec"])
    if how == "no-head":
        del cluster["headGroupSpec"]
    elif how == "replicas-list":
        cluster["workerGroupSpecs"][0]["replicas"] = [1]
    elif how == "start-param-int":
        cluster["headGroupSpec"]["rayStartParams"] = {"num-cpus": 1}
    elif how == "container-no-image-name":
        del cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]
    return doc


@needs_shared
@pytest.mark.parametrize("how", ["no-head", "replicas-list", "start-param-int", "container-no-image-name"])
def test_broken_manifest_fails(how):
    good = ray_resource(load_docs(ROOT / "manifests" / "rayservice-cpu-demo.yaml"))
    with pytest.raises(jsonschema.ValidationError):
        validate_resource(_break(good, how))


@pytest.mark.parametrize("change", [{"engine": {"max_num_seqs": 0}}, {"serve": {"prot": 8000}}, {"backend": "gpu"}])
def test_broken_embedded_config_fails(change):
    config = embedded_config(load_docs(ROOT / "manifests" / "rayservice-cpu-demo.yaml"))
    for key, value in change.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError):
        parse_config(config)


# ----- the image the manifests run, and the volumes they read -------------------------------------
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"


def built_tags(text: str) -> set[str]:
    """The image tags `docker build ... -t TAG` commands in `text` produce."""
    return set(re.findall(r"docker build [^\n]*-t (\S+)", text))


def container_images(resource: dict) -> set[str]:
    return {c["image"] for spec in pod_specs(resource) for c in spec["containers"]}


def test_manifests_run_the_images_the_dockerfile_builds():
    tags = built_tags(DOCKERFILE.read_text())
    assert tags and tags == built_tags(DEPLOY_DOC.read_text()), "docs/deploy.md builds other tags than the Dockerfile"
    for path in MANIFESTS:
        images = container_images(ray_resource(load_docs(path)))
        assert images <= tags, f"{path.name} runs {images - tags}, which docker/Dockerfile does not build"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert all(tag.rsplit(":", 1)[1].startswith(f"{version}-") for tag in tags)


def test_dockerfile_ray_version_is_the_pinned_one():
    ray_pin = re.search(r"^ray==(\S+)", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert f"ARG RAY_VERSION={ray_pin}" in DOCKERFILE.read_text()
    for path in MANIFESTS:
        resource = ray_resource(load_docs(path))
        assert resource["spec"].get("rayClusterConfig", resource["spec"])["rayVersion"] == ray_pin


def test_every_pod_sees_the_model_folder_from_the_defined_claim():
    docs = load_docs(ROOT / "manifests" / "rayservice-gpu-heterogeneous.yaml")
    model = Path(embedded_config(docs)["model"])
    storage = load_docs(ROOT / "manifests" / "storage" / "raymoe-models.yaml")
    (claim,) = [d for d in storage if d["kind"] == "PersistentVolumeClaim"]
    (job,) = [d for d in storage if d["kind"] == "Job"]
    assert str(model) in " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    for spec in pod_specs(ray_resource(docs)):  # the head's too: Serve's build step reads the folder there
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert any(claims.get(n) == claim["metadata"]["name"] and model.is_relative_to(p) for n, p in mounts.items())


def test_bench_manifest_runs_files_the_image_holds():
    text = (ROOT / "manifests" / "raycluster-bench.yaml").read_text()
    workdir = re.search(r"^WORKDIR (\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert re.search(r"^COPY .*\. \.$", DOCKERFILE.read_text(), re.M), "the image keeps the source tree"
    assert f"cd {workdir} &&" in text
    for script in re.findall(r"python (bench/\S+\.py)", text):
        assert (ROOT / script).is_file(), script
