"""docker-compose.yml and the Dockerfile cannot run here (no Docker engine), so check them against the code.

The compose file reads its secrets from the environment (``.env``, from ``.env.example``): it is
checked as ``docker compose`` would see it with ``.env.example``'s values, interpolated here the way
compose does (``${VAR}``, ``${VAR:?message}``, ``${VAR:-default}``, ``$$``).
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
DOCKERFILE = (ROOT / "Dockerfile").read_text()
SECRETS = ("POSTGRES_PASSWORD", "REDIS_PASSWORD")

_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?[?-])([^}]*))?\}|\$(\w+)")


class Missing(KeyError):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """``value`` (a parsed compose document or part of it) with variables substituted as compose does."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        have = env.get(name)
        unset_or_empty = have is None or (have == "" and op and op.startswith(":"))
        if op and op.endswith("?") and unset_or_empty:
            raise Missing(f"{name}: {arg}")
        if op and op.endswith("-") and unset_or_empty:
            return arg
        return have or ""

    return _VAR.sub(sub, value)


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


COMPOSE_RAW = yaml.safe_load(COMPOSE_TEXT)
COMPOSE = interpolate(COMPOSE_RAW, env_example())


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
    assert s.resolved_broker_url().startswith("redis://:") and "@redis:6379/" in s.resolved_broker_url()
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


def test_secrets_come_from_the_environment_with_placeholders_in_env_example():
    example = env_example()
    assert set(SECRETS) <= set(example)
    assert all(example[name].startswith("change-me") for name in SECRETS)
    # every variable the compose file reads is documented in .env.example
    used = {m.group(1) or m.group(4) for m in _VAR.finditer(COMPOSE_TEXT) if m.group(0) != "$$"}
    assert used <= set(example), used - set(example)
    # no literal password left: the stack's secrets are references, required ones (${VAR:?...})
    assert "gradtune:gradtune@" not in COMPOSE_TEXT
    assert COMPOSE_RAW["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    for name in SECRETS:
        with pytest.raises(Missing, match=name):
            interpolate(COMPOSE_RAW, {k: v for k, v in example.items() if k != name})
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


def test_redis_requires_the_password_and_the_broker_url_carries_it():
    redis = COMPOSE["services"]["redis"]
    cmd = _cmd("redis")
    assert cmd[0] == "redis-server" and cmd[cmd.index("--requirepass") + 1] == env_example()["REDIS_PASSWORD"]
    assert "REDISCLI_AUTH" in " ".join(redis["healthcheck"]["test"])  # the probe authenticates
    assert redis["environment"]["REDIS_PASSWORD"] == env_example()["REDIS_PASSWORD"]
    for name in ("api", "worker", "migrate"):
        broker = urlsplit(COMPOSE["services"][name]["environment"]["GRADTUNE_BROKER_URL"])
        assert (broker.scheme, broker.hostname, broker.password) == ("redis", "redis", env_example()["REDIS_PASSWORD"])
        database = urlsplit(COMPOSE["services"][name]["environment"]["GRADTUNE_DATABASE_URL"])
        assert database.password == env_example()["POSTGRES_PASSWORD"]


def test_services_restart_unless_stopped_and_the_migration_runs_once():
    for name, svc in COMPOSE["services"].items():
        assert svc.get("restart") == ("no" if name == "migrate" else "unless-stopped"), name


def test_the_api_waits_for_a_worker_to_be_ready():
    assert COMPOSE["services"]["api"]["environment"]["GRADTUNE_READY_NEEDS_WORKER"] == "true"
    assert Settings(ready_needs_worker="true").ready_needs_worker is True
