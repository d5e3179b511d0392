"""cluster/kuberay.yaml, parsed: the fields it uses exist in KubeRay's ray.io/v1
RayJob (its CRD's field names, pinned here: a typo is an unknown key), and it
asks for what the study's lanes need. Not applied to a Kubernetes cluster."""

from pathlib import Path

import jsonschema
import pytest
import yaml

from scaling.study.cluster import unfinished

REPO = Path(__file__).resolve().parents[1]


def _obj(props: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": props, "additionalProperties": False,
            "required": list(required)}


ANY = {"type": "object"}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# The subset of the RayJob CRD (ray-operator/config/crd/bases/ray.io_rayjobs.yaml,
# KubeRay v1.1+) this manifest uses; pod templates are Kubernetes' own PodTemplateSpec.
POD = _obj({"metadata": ANY, "spec": _obj({
    "containers": {"type": "array", "minItems": 1, "items": _obj({
        "name": {"type": "string"}, "image": {"type": "string"},
        "workingDir": {"type": "string"}, "env": {"type": "array"},
        "resources": _obj({"requests": ANY, "limits": ANY}),
        "volumeMounts": {"type": "array"}}, ("name", "image"))},
    "volumes": {"type": "array"}, "nodeSelector": STR_MAP, "tolerations": {"type": "array"}},
    ("containers",))}, ("spec",))
RAYJOB = _obj({
    "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"},
    "metadata": _obj({"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                      "namespace": {"type": "string"}}, ("name",)),
    "spec": _obj({
        "entrypoint": {"type": "string"}, "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": {"type": "integer"},
        "rayClusterSpec": _obj({
            "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
            "headGroupSpec": _obj({"rayStartParams": STR_MAP, "template": POD}, ("template",)),
            "workerGroupSpecs": {"type": "array", "items": _obj({
                "groupName": {"type": "string"}, "replicas": {"type": "integer"},
                "minReplicas": {"type": "integer"}, "maxReplicas": {"type": "integer"},
                "rayStartParams": STR_MAP, "template": POD}, ("groupName", "template"))}},
            ("headGroupSpec",))}, ("entrypoint", "rayClusterSpec"))},
    ("apiVersion", "kind", "metadata", "spec"))


def _manifest() -> dict:
    return yaml.safe_load((REPO / "cluster" / "kuberay.yaml").read_text())


def test_the_rayjob_parses_and_asks_for_what_the_lanes_need():
    job = _manifest()
    jsonschema.validate(job, RAYJOB)
    spec = job["spec"]["rayClusterSpec"]
    import ray

    assert spec["rayVersion"] == ray.__version__  # the pinned Ray in the image
    head = spec["headGroupSpec"]["rayStartParams"]
    assert yaml.safe_load(yaml.safe_load(head["resources"]))["TRAIN_DRIVER"] >= 1
    assert head["num-cpus"] == "0"  # trial drivers only, no training on the head
    (gpu,) = spec["workerGroupSpecs"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert yaml.safe_load(yaml.safe_load(gpu["rayStartParams"]["resources"])) == {"GPU_1X": 1}
    entry = job["spec"]["entrypoint"]
    assert "studies/model_size.py" in entry and "--address auto" in entry
    # As shipped it is a template: the placeholders are named, as for cluster/gpu.yaml.
    said = unfinished(job, "kuberay.yaml")
    assert any("EDIT-your-bucket" in p for p in said) and any("EDIT-datasets" in p for p in said)


@pytest.mark.parametrize("break_it, where", [
    (lambda j: j["spec"].update(entrypont="x"), "entrypont"),
    (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(maxReplica=3),
     "maxReplica"),
    (lambda j: j.update(apiVersion="ray.io/v1alpha1"), "ray.io/v1"),
])
def test_a_typo_is_an_unknown_key(break_it, where):
    job = _manifest()
    break_it(job)
    with pytest.raises(jsonschema.ValidationError, match=where):
        jsonschema.validate(job, RAYJOB)


def test_the_cluster_check_names_its_placeholders_and_passes_it_once_filled(tmp_path, capsys):
    from scaling.study import cluster

    text = (REPO / "cluster" / "kuberay.yaml").read_text()
    assert cluster.main([str(REPO / "cluster" / "kuberay.yaml")]) == 2
    assert capsys.readouterr().err.count("still holds the placeholder") == 5
    filled = tmp_path / "kuberay.yaml"
    filled.write_text(text.replace("EDIT-your-bucket", "lab").replace("EDIT-registry", "reg.lab")
                      .replace("EDIT-datasets", "datasets"))
    assert cluster.main([str(filled)]) == 0
    assert "ok (Kubernetes RayJob" in capsys.readouterr().out
