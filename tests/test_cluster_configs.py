"""cluster/: launcher YAMLs pass Ray's own cluster-config schema, the KubeRay manifests parse
and run this project, token auth is on, and no Ray port is open to the world."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
LAUNCHERS = ["onprem.yaml", "aws.yaml"]
RAY_PORTS = {6379, 8265, 10001}


def _validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_passes_rays_schema(name):
    _validate(yaml.safe_load((CLUSTER / name).read_text()))


def test_the_schema_check_can_fail():
    import jsonschema

    config = yaml.safe_load((CLUSTER / "onprem.yaml").read_text())
    config["provider"]["typo_field"] = 1
    config["not_a_field"] = True
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate(config)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_keeps_token_auth_and_a_loopback_dashboard(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head and "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token ray start --address" in workers
    assert "~/.ray/auth_token" in config["file_mounts"]


def _open_to_world(permissions: list[dict]) -> list[int]:
    bad = []
    for p in permissions:
        world = any(r.get("CidrIp") == "0.0.0.0/0" for r in p.get("IpRanges", [])) or any(
            r.get("CidrIpv6") == "::/0" for r in p.get("Ipv6Ranges", [])
        )
        if world:
            lo, hi = p.get("FromPort", 0), p.get("ToPort", 65535)
            bad += [port for port in RAY_PORTS if lo <= port <= hi] or ([lo] if p.get("IpProtocol") == "-1" else [])
    return bad


def test_no_ray_port_is_open_to_the_world():
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    perms = aws["provider"]["security_group"]["IpPermissions"]
    assert _open_to_world(perms) == []
    assert _open_to_world(
        [{"FromPort": 0, "ToPort": 65535, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    )  # the check itself bites
    for f in CLUSTER.rglob("*.yaml"):
        text = f.read_text()
        assert "0.0.0.0/0" not in re.sub(r"#.*", "", text), f


def _manifests():
    docs = []
    for f in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        docs += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_manifests_parse_and_run_this_project():
    kinds = {(name, d["kind"]) for name, d in _manifests()}
    assert ("raycluster.yaml", "RayCluster") in kinds and ("rayjob.yaml", "RayJob") in kinds
    for name, d in _manifests():
        assert d["apiVersion"] and d["metadata"]["name"], name
        if d["kind"] == "RayJob":
            entry = " ".join(d["spec"]["entrypoint"].split())
            assert entry.startswith("distributed-maml train --config /app/jobs/") and "--output-dir /mnt/runs/" in entry
            cluster_spec = d["spec"]["rayClusterSpec"]
        elif d["kind"] == "RayCluster":
            cluster_spec = d["spec"]
        elif d["kind"] == "RayService":
            cluster_spec = d["spec"]["rayClusterConfig"]
        else:
            continue
        # token auth on (the operator puts RAY_AUTH_MODE=token and the token on every container)
        assert cluster_spec["authOptions"] == {"mode": "token", "secretName": "ray-auth-token"}
        # nothing exposed outside the cluster
        assert cluster_spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
        for c in _containers(cluster_spec):
            assert c["image"].startswith("ghcr.io/your-org/distributed-maml")
            assert all("hostPort" not in p for p in c.get("ports", [])), name
            assert any(m["mountPath"] == "/mnt/runs" for m in c["volumeMounts"])


def _serve_configs() -> list[tuple[str, dict]]:
    out = [("jobs/serve.yaml", yaml.safe_load((CLUSTER.parent / "jobs" / "serve.yaml").read_text()))]
    for name, d in _manifests():
        if d["kind"] == "RayService":
            out.append((name, yaml.safe_load(d["spec"]["serveConfigV2"])))
    return out


def test_serve_configs_pass_serves_schema_and_build_the_app(tmp_path, monkeypatch):
    """jobs/serve.yaml and the RayService's serveConfigV2 pass Ray Serve's own schema, and their
    args build the app (ServeSettings): beyond loopback only with a token file, and http_options
    binds where `host` says."""
    from ray.serve.schema import ServeDeploySchema

    from distributed_maml.errors import UserError
    from distributed_maml.use import serving

    configs = _serve_configs()
    assert [n for n, _ in configs] == ["jobs/serve.yaml", "rayservice.yaml"]
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123\n")
    for name, cfg in configs:
        ServeDeploySchema.model_validate(cfg)
        (app,) = cfg["applications"]
        assert app["import_path"] == "distributed_maml.use.serving:app_builder", name
        args = dict(app["args"])
        assert args["host"] == cfg["http_options"]["host"], name
        if "token_file" in args:
            args["token_file"] = str(token)
        settings = serving.ServeSettings.from_args(args)
        assert settings.source == args["source"] and (settings.token is not None) == ("token_file" in args)
        if not serving.is_loopback(args["host"]):  # beyond loopback: a token, or no app
            with pytest.raises(UserError, match="give --token-file"):
                serving.ServeSettings.from_args({k: v for k, v in args.items() if k != "token_file"})
    with pytest.raises(UserError, match="serve config args"):
        serving.ServeSettings.from_args({"source": "x", "replicaz": 2})


def test_dockerfile_installs_the_project():
    text = (CLUSTER / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0" in text and "pip install --no-cache-dir /app" in text
