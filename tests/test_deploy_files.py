"""deploy/: what can be checked offline. The systemd unit with systemd-analyze (verify
and the security score), the Kubernetes manifests against the API schemas
(kubernetes-validate ships them), the Dockerfile parsed, and every command line they
hold parsed by gwyh-node's own argument parser (with their config file and GWYH_*
variables), so a renamed flag breaks this test rather than a deployment. Plus the
LICENSE the package declares."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from gwyh_mp import configfile
from gwyh_mp.cli import build_run_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "gwyh-node.service"
MAX_EXPOSURE = 2.5
K8S_VERSION = "1.30.0"


def _parse_node_args(argv: list[str], env: dict[str, str] | None = None) -> Any:
    return configfile.parse_layered(build_run_parser(), argv, env or {}).args


# ------------------------------------------------------------------ systemd


def _exec_start() -> str:
    text = UNIT.read_text()
    found = re.search(r"^ExecStart=(.*?[^\\])$", text, re.M | re.S)
    assert found
    return found.group(1).replace("\\\n", " ")


def test_unit_command_line_parses_with_the_config_file() -> None:
    env = {"CREDENTIALS_DIRECTORY": "/run/credentials/gwyh-node.service"}
    words = [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], w) for w in _exec_start().split()]
    installed = "/etc/gwyh/gwyh-node.toml"  # where the unit's install comment copies it
    assert installed in words and "cp deploy/gwyh-node.toml /etc/gwyh/" in UNIT.read_text()
    words = [str(DEPLOY / "gwyh-node.toml") if w == installed else w for w in words]
    args = _parse_node_args(words[1:])
    assert args.psk_file == ["/run/credentials/gwyh-node.service/cluster.key"]
    assert args.metrics == ("0.0.0.0", 9469)
    assert args.bind == ("0.0.0.0", 6969) and args.advertise is not None and args.bootstrap
    assert args.data_dir == "/var/lib/gwyh" and "StateDirectory=gwyh\n" in UNIT.read_text()


def test_unit_install_comment_installs_from_the_repository() -> None:
    text = UNIT.read_text()
    assert "pip install /path/to/gwyh_mp" in text
    assert not re.search(r"pip install gwyh_mp\b", text)  # not on PyPI


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_verifies_and_scores_at_most_2_5(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at this checkout's CLI.
    unit = tmp_path / "gwyh-node.service"
    unit.write_text(UNIT.read_text().replace("/opt/gwyh/bin/gwyh-node", sys.executable))
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr == "", verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    assert found, security.stdout + security.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, security.stdout


# ------------------------------------------------------------------ Kubernetes


def _manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _by_kind(kind: str) -> dict[str, Any]:
    [doc] = [d for d in _manifests() if d["kind"] == kind]
    return doc


def test_manifests_match_the_kubernetes_schemas() -> None:
    docs = _manifests()
    assert {d["kind"] for d in docs} >= {"Service", "StatefulSet", "PodDisruptionBudget"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_schema_check_rejects_a_broken_manifest() -> None:
    broken = _by_kind("StatefulSet")
    broken["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    typo = _by_kind("Service")
    typo["spec"]["clusterIp"] = "None"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)


def test_statefulset_bootstraps_from_its_headless_service_with_the_psk_secret() -> None:
    service = _by_kind("Service")
    sts = _by_kind("StatefulSet")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    pod = sts["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {"POD_IP": "10.1.2.3", "POD_NAMESPACE": "prod"}

    def expand(text: str) -> str:
        return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], text)

    argv = [expand(a) for a in container.get("args", [])]
    node_env = _docker_env() | {
        e["name"]: expand(e["value"]) for e in container["env"] if "value" in e
    }
    args = _parse_node_args(_docker_entrypoint()[1:] + argv, node_env)
    name = service["metadata"]["name"]
    assert [h for h, _ in args.bootstrap] == [f"{name}.prod.svc.cluster.local"]
    assert args.advertise == ("10.1.2.3", 6969)
    # The key file the image reads is the Secret's.
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == args.psk_file[0]]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "secretName" in volume["secret"]
    probes = {container["livenessProbe"]["httpGet"]["path"]}
    probes.add(container["readinessProbe"]["httpGet"]["path"])
    assert probes == {"/healthz", "/readyz"}
    assert args.metrics[1] in {p["containerPort"] for p in container["ports"]}
    # --workers follows the CPU limit (cgroup cpu.max); each receiver's two rings must
    # fit the /dev/shm volume.
    workers = int(container["resources"]["limits"]["cpu"])
    [shm] = [v for v in pod["volumes"] if v["name"] == "shm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert int(shm["emptyDir"]["sizeLimit"].removesuffix("Mi")) >= workers * 2 * 16 + 8
    pdb = _by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"] == sts["spec"]["selector"]


# ------------------------------------------------------------------ Docker


def _dockerfile() -> DockerfileParser:
    parser = DockerfileParser(path=str(DEPLOY / "Dockerfile"))
    return parser


def _docker_env() -> dict[str, str]:
    return dict(_dockerfile().envs)


def _docker_entrypoint() -> list[str]:
    import json

    [entry] = [i for i in _dockerfile().structure if i["instruction"] == "ENTRYPOINT"]
    return json.loads(entry["value"])


def test_dockerfile_runs_slim_non_root_with_a_health_check() -> None:
    parser = _dockerfile()
    assert re.fullmatch(r"python:3\.1[1-9]-slim.*", parser.baseimage)
    instructions = parser.structure
    users = [i["value"] for i in instructions if i["instruction"] == "USER"]
    assert users and not users[-1].startswith(("0", "root"))
    [health] = [i["value"] for i in instructions if i["instruction"] == "HEALTHCHECK"]
    assert "/healthz" in health
    exposed = " ".join(i["value"] for i in instructions if i["instruction"] == "EXPOSE")
    assert "/udp" in exposed
    args = _parse_node_args(_docker_entrypoint()[1:], _docker_env())
    assert args.psk_file == ["/run/secrets/gwyh-psk"] and args.bind == ("0.0.0.0", 6969)
    assert str(args.metrics[1]) in health


# ------------------------------------------------------------------ license


def test_license_is_the_lgpl_3_the_package_declares() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "GNU LESSER GENERAL PUBLIC LICENSE\n                       Version 3" in text
    assert "GNU GENERAL PUBLIC LICENSE\n                       Version 3" in text
    assert 'license = { text = "LGPL-3.0-only" }' in (ROOT / "pyproject.toml").read_text()
