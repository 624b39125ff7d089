"""The container recipe. No container runtime can build images here (no daemon, no base
images offline), so the image's two steps are scripts the Dockerfile runs and these tests
check: docker/install.sh (CI installs the package with it into a fresh virtual
environment, LDM_INSTALLED_PYTHON) and docker/start.sh, which must serve from there."""

import os
import re
import sys

import httpx
import pytest
from servingutils import ROOT, free_port, serving

pytestmark = pytest.mark.xdist_group("server")


def test_the_dockerfile_installs_and_starts_with_the_scripts():
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")  # joined lines
    assert re.search(r"RUN .*docker/install\.sh /opt/ldm/bin/python", dockerfile)
    assert "install -m 755 docker/start.sh /usr/local/bin/ldm-start" in dockerfile
    assert 'ENTRYPOINT ["ldm-start"]' in dockerfile
    user = re.search(r"^USER (\S+)$", dockerfile, re.M)
    assert user and user.group(1) not in ("root", "0")
    assert re.search(r"HEALTHCHECK .*/readyz", dockerfile)
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in dockerfile
    compose = (ROOT / "compose.yaml").read_text()
    mounts = re.findall(r"^\s+- \./[^:\s]+:(\S+)$", compose, re.M)
    assert mounts == ["/models:ro", "/adapters:ro"]


def test_the_start_script_serves_the_installed_package(model, tmp_path):
    python = os.environ.get("LDM_INSTALLED_PYTHON", sys.executable)
    port = free_port()
    env = {
        "PYTHON": python,
        "LDM_CHECKPOINT": str(model["checkpoint"]),
        "LDM_ADAPTERS": str(model["adapters"]),
        "LDM_HOST": "127.0.0.1",
        "LDM_PORT": str(port),
        "LDM_TOKEN_FILE": str(model["root"] / "token"),
    }
    command = ["sh", str(ROOT / "docker" / "start.sh"), "threads=1"]
    with serving(command, port, env) as (url, _):
        token = (model["root"] / "token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        info = httpx.get(f"{url}/v1/models", headers=headers).json()
        assert "style.safetensors" in info["adapters"]
        response = httpx.post(
            f"{url}/v1/images",
            json={"prompt": "a red circle", "steps": 2, "response_format": "png"},
            headers=headers,
            timeout=60,
        )
        assert response.status_code == 200 and response.content[:4] == b"\x89PNG"
