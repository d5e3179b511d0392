"""Ray cluster-launcher configs (cluster/*.yaml): offline validation, and the
resources an autoscaling cluster can grow to.

    python -m scaling.study.cluster cluster/gpu.yaml cluster/local.yaml

checks each file the way ``ray up`` will (Ray's own schema and config checks,
no cloud credentials needed) plus what this project relies on: the head node
carries the ``TRAIN_DRIVER`` resource, nodes get the project installed, and the
local files to upload exist. Ray's checks are private API
(``ray.autoscaler._private.util``); tests/test_cluster.py pins them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from scaling import storage
from scaling.config import ConfigError, ConfigFileError
from scaling.configure import parse_yaml
from scaling.storage import Location

DRIVER_RESOURCE = "TRAIN_DRIVER"  # the custom resource trial drivers are scheduled on
# Written on the head node by `ray up`: the config as the launcher prepared it.
BOOTSTRAP = Path("~/ray_bootstrap_config.yaml")


def _where(path: Any) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _schema_error(e: Any, source: str) -> ConfigError:
    """Ray's schema error naming the one offending key, never the whole mapping."""
    path = list(e.absolute_path)
    if e.validator == "additionalProperties" and isinstance(e.instance, dict):
        known = set(e.schema.get("properties", {}))
        extra = sorted(k for k in e.instance if k not in known)[0]
        return ConfigFileError(_where([*path, extra]), f"{source}: {_where([*path, extra])} "
                               "is not a key Ray's cluster schema knows there; allowed: "
                               + ", ".join(sorted(known)))
    if e.validator == "required":
        missing = e.message.split("'")[1]
        return ConfigFileError(_where([*path, missing]), f"{source}: {_where([*path, missing])}"
                               " is missing; Ray's cluster schema requires it")
    value = e.instance if not isinstance(e.instance, dict | list) else type(e.instance).__name__
    return ConfigError(f"{source}: {_where(path)}", value, f"Ray's cluster schema: "
                       f"{e.message if len(e.message) < 200 else e.validator}")


def validate(raw: Any, source: str = "cluster config", base: Path | None = None) -> dict:
    """The config as ``ray up`` would use it, or ConfigError naming the key, the
    value and what is allowed. ``base``: where local file_mounts paths resolve
    (the directory ``ray up`` runs in); None skips that check."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    if not isinstance(raw, dict):
        raise ConfigError(source, type(raw).__name__, "a YAML mapping of the launcher's keys")
    said = io.StringIO()
    try:
        # Ray's schema first, on the file as written, so an unknown key is reported
        # as such rather than as whatever filling in defaults turns it into.
        import ray.autoscaler

        schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
        jsonschema.validate(raw, json.loads(schema_path.read_text()))
        # Ray's launcher prints warnings (file mounts of single files: a docker concern)
        # and errors itself; keep its words for the message and the console clean.
        quiet = logging.getLogger("ray.autoscaler")  # "setting max workers for head ..."
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
                config = prepare_config(copy.deepcopy(raw))
                validate_config(config)
        finally:
            quiet.setLevel(level)
    except jsonschema.ValidationError as e:
        raise _schema_error(e, source) from None
    except Exception as e:  # noqa: BLE001 - Ray raises ValueError, KeyError, click errors
        printed = [line.strip() for line in said.getvalue().splitlines()
                   if line.strip() and "WARN" not in line and "To ensure" not in line]
        words = " ".join([str(e), *printed]).strip()
        raise ConfigError(source, type(e).__name__, f"Ray's config checks: {words}") from None
    _check_project(raw, config, source, base)
    return config


def _check_project(raw: dict, config: dict, source: str, base: Path | None) -> None:
    """What the studies need beyond a config Ray accepts."""
    starts = " ".join(config.get("head_start_ray_commands", []))
    head = config["available_node_types"][config["head_node_type"]]
    if DRIVER_RESOURCE not in head.get("resources", {}) and DRIVER_RESOURCE not in starts:
        raise ConfigError(f"{source}: available_node_types.{config['head_node_type']}.resources",
                          head.get("resources"),
                          f"a {DRIVER_RESOURCE} resource on the head node (the study's trial "
                          "drivers run there), or --resources in head_start_ray_commands")
    setup = " ".join(config.get("setup_commands", []))
    if "pip install" not in setup:
        raise ConfigError(f"{source}: setup_commands", raw.get("setup_commands"),
                          "commands that pip-install the project on every node")
    if base is None:
        return
    for remote, local in config.get("file_mounts", {}).items():
        path = Path(os.path.expanduser(local))
        if not (base / path).exists():
            hint = (" (run `ray get-auth-token --generate` first)"
                    if Path(remote).name == "auth_token"
                    else " (run ray up from the repository root)")
            raise ConfigError(f"{source}: file_mounts.{remote}", local,
                              f"a local path that exists{hint}")


PLACEHOLDER = re.compile(r"\bEDIT\b|EDIT-")
# Paths the study reads on every node: relative ones resolve against whatever
# directory a Ray worker happens to run in (~ for `ray submit`), not the checkout.
NODE_PATH = re.compile(r"\b(SCALING_STORAGE|data\.root)=['\"]?([^\s'\"]+)")


def _strings(value: Any, path: tuple = ()) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, (*path, i))
    elif isinstance(value, str):
        yield _where(path), value


def unfinished(raw: dict, source: str) -> list[str]:
    """What a template still leaves to its user: ``EDIT`` placeholders, and study
    storage or data roots that are relative paths. ``validate`` accepts these (the
    shipped templates must pass Ray's checks); the command line refuses them."""
    problems = []
    for where, text in _strings(raw):
        if PLACEHOLDER.search(text):
            shown = next(w for w in text.split() if PLACEHOLDER.search(w)).strip("'\"")
            problems.append(f"{source}: {where} still holds the placeholder {shown!r}: "
                            "replace it (docs/cluster.md, first steps)")
        for name, value in NODE_PATH.findall(text):
            if "://" not in value and not value.startswith(("/", "~", "$")):
                problems.append(f"{source}: {where} sets {name}={value}, a relative path: "
                                "give an absolute path (Ray workers do not run in the "
                                "checkout) or a URI such as s3://bucket/studies")
    return problems


def load(path: str | Path, base: Path | None = None) -> dict:
    return validate(parse_yaml(Path(path).read_text(), str(path)), str(path), base)


def max_resources(config: dict) -> dict[str, float] | None:
    """The most of each resource the cluster can hold: the head plus every worker
    type at its max_workers, within the global max_workers (largest nodes first).
    None where a node type leaves its resources to be detected (local provider)."""
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    if any(not t.get("resources") for t in types.values()):
        return None
    total: dict[str, float] = dict(head["resources"])
    left = config.get("max_workers", 0)
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    for t in sorted(workers, key=lambda t: -sum(t["resources"].values())):
        n = min(t.get("max_workers", 0), left)
        left -= n
        for key, value in t["resources"].items():
            total[key] = total.get(key, 0) + n * value
    return total


# Memory per GPU by EC2 instance family, in GB as AWS sells it (10^9 bytes): the
# limit a memory plan is checked against (scaling.study.memory).
GPU_MEMORY_GB = {"g5": 24, "g6": 24, "g6e": 48, "p3": 16, "p3dn": 32, "p4d": 40, "p4de": 80,
                 "p5": 80, "p5e": 141, "p5en": 141}


def gpu_instances(config: dict) -> list[tuple[str, str, int]]:
    """(node type, instance type or '', GPUs) of every worker type with GPUs."""
    return [(name, str(t.get("node_config", {}).get("InstanceType", "")),
             int(t.get("resources", {}).get("GPU", 0)))
            for name, t in config["available_node_types"].items()
            if int(t.get("resources", {}).get("GPU", 0))]


def gpu_nodes(config: dict) -> list[tuple[str, int, int | None]]:
    """(node type, GPUs, bytes per GPU or None where the instance type is unknown)
    of every worker type with GPUs."""
    out = []
    for name, instance, gpus in gpu_instances(config):
        gb = GPU_MEMORY_GB.get(instance.split(".")[0])
        out.append((name, gpus, None if gb is None else gb * 10**9))
    return out


def holds_lane(node_gpus: int, every_node_gpus: list[int], lane: int) -> bool:
    """Whether a lane of ``lane`` GPUs can land on this node type: it packs onto one
    node where one node holds it, else it spreads over nodes of the largest type."""
    return node_gpus >= min(lane, max(every_node_gpus, default=0))


def bootstrap_config() -> dict | None:
    """On a head node started by ``ray up``: the cluster's config, or None."""
    path = BOOTSTRAP.expanduser()
    if not path.exists():
        return None
    try:
        config = yaml.safe_load(path.read_text())
        return config if isinstance(config, dict) else None
    except (OSError, yaml.YAMLError):
        return None


def autoscaling_limit() -> dict[str, float] | None:
    """On a head node started by ``ray up``: what the cluster can grow to."""
    config = bootstrap_config()
    try:
        return None if config is None else max_resources(config)
    except (KeyError, TypeError, AttributeError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scaling.study.cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="cluster YAML files")
    args = p.parse_args(argv)
    failed = 0
    for path in args.configs:
        if not Path(path).is_file():
            shipped = ", ".join(str(p) for p in sorted(Path("cluster").glob("*.yaml")))
            print(f"error: {path}: no such file" + (f" (shipped: {shipped})" if shipped else ""),
                  file=sys.stderr)
            failed += 1
            continue
        try:
            raw = parse_yaml(Path(path).read_text(), str(path))
            if isinstance(raw, dict) and "apiVersion" in raw and "kind" in raw:
                # A Kubernetes manifest (cluster/kuberay.yaml): kubectl checks it against
                # the CRD; here only what a template leaves to fill in.
                left = unfinished(raw, str(path))
                for problem in left:
                    print(f"error: {problem}", file=sys.stderr)
                failed += bool(left)
                if not left:
                    print(f"{path}: ok (Kubernetes {raw['kind']}: no placeholders left; "
                          "kubectl checks the rest)")
                continue
            config = load(path, base=Path.cwd())
        except (ConfigError, OSError, yaml.YAMLError) as e:
            print(f"error: {e}", file=sys.stderr)  # every message names the file
            failed += 1
            continue
        left = unfinished(parse_yaml(Path(path).read_text(), str(path)), str(path))
        for problem in left:
            print(f"error: {problem}", file=sys.stderr)
        if left:
            failed += 1
            continue
        most = max_resources(config)
        grows = (", ".join(f"{k} {v:g}" for k, v in sorted(most.items()))
                 if most else "detected on each machine")
        print(f"{path}: ok ({config['provider']['type']}; at most: {grows})")
    return 2 if failed else 0


# --- Connecting a sweep to Ray (imported when it connects: planning needs no Ray) ---


def connect(address: str | None, local_cpus: Callable[[], int], verbose: bool = True) -> bool:
    """Join ``address`` ('auto': the running cluster, as under ``ray submit``) or
    start a local Ray with ``local_cpus()`` cores and a driver resource. True if it
    joined.
    Not ``verbose``: Ray's start-up lines (token notice, "Started a local Ray
    instance") stay out of the console; its errors still come through."""
    import ray

    if ray.is_initialized():
        return False
    level = logging.INFO if verbose else logging.ERROR
    if address:
        ray.init(address=address, logging_level=level)
        return True
    if ray_running_here():  # a cluster started here (ray start / ray up; ray submit)?
        try:
            ray.init(address="auto", logging_level=level)
            print("joined the running Ray cluster", flush=True)
            return True
        except ConnectionError:
            pass
    cpus = local_cpus()
    # "local": a new instance even where a dead cluster left its address file.
    ray.init(address="local", num_cpus=cpus, resources={DRIVER_RESOURCE: 1000},
             include_dashboard=False, logging_level=level)
    return False


def ray_running_here() -> bool:
    """RAY_ADDRESS set, or a GCS process on this machine. Not just Ray's address file:
    a killed cluster leaves it behind, and joining that address hangs."""
    if os.environ.get("RAY_ADDRESS"):
        return True
    try:
        from ray._private.services import find_gcs_addresses
    except ImportError:  # moved in a later Ray: let ray.init decide
        return True
    return bool(find_gcs_addresses())


def cluster_resources(limit: dict[str, float] | None) -> dict[str, float]:
    """What the cluster has now or, on a head node started by ``ray up``, what the
    autoscaler can grow it to (``limit``): GPU nodes start only once trials ask."""
    import ray

    now = dict(ray.cluster_resources())
    for key, value in (limit or {}).items():
        now[key] = max(now.get(key, 0.0), float(value))
    return now


def warn_if_not_shared(root: Location, joined: bool, limit: dict[str, float] | None) -> None:
    """A local path must be shared (NFS) by every node of a multi-node cluster."""
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if joined and not storage.is_uri(root) and (nodes > 1 or limit):
        print(f"warning: --storage {root} is a local path on a multi-node cluster: every "
              "node must see it at that path (NFS); otherwise use s3://bucket/studies",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
