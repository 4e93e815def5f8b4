"""deploy/ray: the cluster config passes Ray's own schema, the RayService's Serve config passes
Serve's, and its args build the application (no cluster started)."""
import os

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name: str):
    with open(os.path.join(ROOT, "deploy", "ray", name)) as f:
        return yaml.safe_load(f)


def test_cluster_config_is_valid_for_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_load("cluster.yaml")))


def test_rayservice_serve_config_builds_the_application():
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    import ray

    service = _load("rayservice.yaml")
    assert service["kind"] == "RayService"
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    app = config.applications[0]
    module, _, attr = app.import_path.partition(":")
    builder = getattr(__import__(module, fromlist=[attr]), attr)
    assert isinstance(builder(app.args), Application)


def test_app_builder_rejects_bad_flags():
    import pytest

    from lenserve.server.ray_serve import app_builder

    with pytest.raises(ValueError, match="--min-replicas"):
        app_builder({"replicas": 9, "min_replicas": 1, "max_replicas": 4})
    with pytest.raises(SystemExit):
        app_builder({"router": "random"})
