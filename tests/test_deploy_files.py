"""docker-compose.yml and the Dockerfile cannot run here (no Docker engine), so check them against the code."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _cmd(service: str) -> list[str]:
    cmd = COMPOSE["services"][service]["command"]
    return cmd if isinstance(cmd, list) else shlex.split(cmd)


def test_services_are_the_production_stack():
    assert set(COMPOSE["services"]) == {"postgres", "redis", "migrate", "api", "worker"}


def test_every_gradtune_variable_is_a_setting():
    fields = {f"GRADTUNE_{name.upper()}" for name in Settings.model_fields}
    seen = set()
    for name, svc in COMPOSE["services"].items():
        for var in svc.get("environment", {}) or {}:
            if var.startswith("GRADTUNE_"):
                assert var in fields, f"{name}: {var} is not a gradtune setting"
                seen.add(var)
    assert {"GRADTUNE_DATABASE_URL", "GRADTUNE_BROKER_URL"} <= seen


def test_urls_point_at_the_compose_services_and_parse():
    env = COMPOSE["services"]["api"]["environment"]
    s = Settings(database_url=env["GRADTUNE_DATABASE_URL"], broker_url=env["GRADTUNE_BROKER_URL"])
    assert s.resolved_database_url().startswith("postgresql+psycopg://")  # psycopg 3 driver
    assert "@postgres:5432/" in s.resolved_database_url()
    assert s.resolved_broker_url().startswith("redis://redis:6379")
    pg = COMPOSE["services"]["postgres"]["environment"]
    assert (
        f"{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"
        in env["GRADTUNE_DATABASE_URL"]
    )
    for name in ("migrate", "worker"):
        assert COMPOSE["services"][name]["environment"]["GRADTUNE_DATABASE_URL"] == env["GRADTUNE_DATABASE_URL"]


def test_commands_exist_in_the_code():
    from typer.main import get_command

    from gradtune.cli import cli

    commands = set(get_command(cli).commands)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["gradtune"] == "gradtune.cli:main"
    for service, sub in (("migrate", "migrate"), ("worker", "worker")):
        assert _cmd(service)[:2] == ["gradtune", sub] and sub in commands
    api = _cmd("api")
    assert api[0] == "uvicorn" and "--factory" in api
    module, attr = next(a for a in api if ":" in a).split(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), attr))


def test_migration_runs_before_api_and_worker():
    for name in ("api", "worker"):
        dep = COMPOSE["services"][name]["depends_on"]
        assert dep["migrate"]["condition"] == "service_completed_successfully"


def test_build_targets_exist_and_api_image_has_no_torch():
    targets = set(re.findall(r"^FROM \S+ AS (\w+)", DOCKERFILE, re.M))
    for name in ("migrate", "api", "worker"):
        assert COMPOSE["services"][name]["build"]["target"] in targets
    api_stage = DOCKERFILE.split("FROM api AS worker")[0]
    assert "torch" not in api_stage.replace("no torch", "")
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(d.startswith(("torch", "numpy", "scikit")) for d in base)
