"""The deployment files: docker-compose.yml (and compose.sentinel.yml over it), workers/Dockerfile
and the systemd units.

No Docker engine or systemd runs here, so their structure is checked, and every command they
run is parsed by the real CLI (an unknown command or option fails here, not on a GPU host).
"""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from sage_mq.cli import app
from sage_mq.redis_urls import check_redis_url, parse_sentinel_url
from sage_mq.settings import ENV_REDIS_URL

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "workers" / "systemd"


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def _sentinel_override() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.sentinel.yml").read_text())
    return loaded


def _with_defaults(text: str) -> str:
    """Compose's ``${VAR:-default}`` as the default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


def _parse_cli(args: list[str]) -> typer.Context:
    """Walk ``args`` down to a leaf command and parse its options, as running it would."""
    command: Any = typer.main.get_command(app)
    ctx: typer.Context | None = None
    names, rest = ["sage"], list(args)
    while hasattr(command, "get_command"):  # a group: the next word names a subcommand
        assert rest, f"{args} ends at the group {names[-1]!r}"
        ctx = typer.Context(command, info_name=names[-1], parent=ctx)
        sub = command.get_command(ctx, rest[0])
        assert sub is not None, f"no command {rest[0]!r} under {' '.join(names)}"
        command, names, rest = sub, [*names, rest[0]], rest[1:]
    parsed: typer.Context = command.make_context(names[-1], rest, parent=ctx)
    return parsed


def test_the_cli_check_itself_refuses_what_the_cli_would() -> None:
    assert _parse_cli(["llm", "node", "run", "--node-id", "n1"]).params["node_id"] == "n1"
    with pytest.raises(Exception, match="No such option"):
        _parse_cli(["llm", "node", "run", "--no-such-flag"])
    with pytest.raises(typer.BadParameter, match="valid integer"):
        _parse_cli(["llm", "gateway", "run", "--port", "eighty"])
    with pytest.raises(AssertionError, match="no command 'no-such-command'"):
        _parse_cli(["llm", "no-such-command"])


def test_compose_has_every_role_built_from_workers_and_wired_to_redis() -> None:
    services = _compose()["services"]
    assert set(services) == {"redis", "scheduler", "gateway", "worker", "node"}
    dockerfile = (ROOT / "workers" / "Dockerfile").read_text()
    for name in ("scheduler", "gateway", "worker", "node"):
        service = services[name]
        build = service["build"]
        assert (build["context"], build["dockerfile"]) == (".", "workers/Dockerfile")
        assert re.search(rf"^FROM \S+ AS {build['target']}$", dockerfile, re.M), build
        assert _with_defaults(service["environment"][ENV_REDIS_URL]) == "redis://redis:6379/0"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["restart"] == "unless-stopped"
        command = [_with_defaults(str(part)) for part in service["command"]]
        assert command[:2] == ["llm", name]
        _parse_cli(command)
    assert services["node"]["build"]["target"] == "node"
    assert services["scheduler"]["deploy"]["replicas"] >= 2


def test_compose_redis_keeps_its_data_in_an_append_only_file() -> None:
    redis = _compose()["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert redis["healthcheck"]["test"][-1] == "ping"


def test_compose_node_reserves_the_gpus_and_gateway_publishes_8000() -> None:
    services = _compose()["services"]
    devices = services["node"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    node_args = [_with_defaults(str(part)) for part in services["node"]["command"]]
    assert _parse_cli(node_args).params["advertise_address"] == "node"  # the gateway's way in
    assert services["node"]["hostname"] == "node"
    assert [_with_defaults(p) for p in services["gateway"]["ports"]] == ["8000:8000"]
    gateway = _parse_cli(services["gateway"]["command"]).params
    assert (gateway["host"], gateway["port"]) == ("0.0.0.0", 8000)


def test_compose_will_not_start_the_gateway_without_its_keys() -> None:
    environment = _compose()["services"]["gateway"]["environment"]
    for name in ("SAGE_MQ_API_KEY", "SAGE_MQ_ADMIN_KEY"):
        assert re.fullmatch(rf"\$\{{{name}:\?.+\}}", environment[name]), environment[name]
    for name, service in _compose()["services"].items():
        if name != "gateway":  # only the gateway needs them (engines never get them)
            assert "SAGE_MQ_ADMIN_KEY" not in str(service.get("environment", {})), name


def test_the_systemd_gateway_needs_its_keys_and_is_not_restarted_without_them() -> None:
    env = (SYSTEMD / "sage-mq.env").read_text()
    assert re.search(r"^SAGE_MQ_API_KEY=$", env, re.M)
    assert re.search(r"^SAGE_MQ_ADMIN_KEY=$", env, re.M)  # empty: the gateway refuses
    service = _unit(SYSTEMD / "sage-gateway.service")["Service"]
    assert "--host 0.0.0.0" in service["ExecStart"]
    assert service["RestartPreventExitStatus"] == "78"  # the refusal's exit status


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


@pytest.mark.parametrize("unit", sorted(p.name for p in SYSTEMD.glob("*.service")))
def test_systemd_units_run_real_commands_from_the_env_file(unit: str) -> None:
    service = _unit(SYSTEMD / unit)["Service"]
    assert service["EnvironmentFile"] == "/etc/sage-mq/sage-mq.env"
    assert service["User"] == "sage" and service["Restart"] == "always"
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "/opt/sage-mq/bin/sage"
    args = [re.sub(r"%[Hi]|\$\{[A-Z_]+\}", "x", a) for a in argv[1:]]
    _parse_cli(args)


def test_the_node_agent_unit_leaves_engines_running_when_the_agent_restarts() -> None:
    service = _unit(SYSTEMD / "sage-node-agent.service")["Service"]
    assert service["KillMode"] == "process"
    assert shlex.split(service["ExecStart"])[1:4] == ["llm", "node", "run"]
    units = {p.name for p in SYSTEMD.glob("*.service")}
    assert units == {
        "sage-node-agent.service",
        "sage-scheduler.service",
        "sage-gateway.service",
        "sage-worker@.service",
    }
    env = (SYSTEMD / "sage-mq.env").read_text()
    assert f"{ENV_REDIS_URL}=" in env and "0600" in env


def test_the_sentinel_override_puts_every_role_behind_three_sentinels() -> None:
    base, over = _compose()["services"], _sentinel_override()["services"]
    sentinels = ["sentinel-1", "sentinel-2", "sentinel-3"]
    for name in (n for n in base if n != "redis"):  # every sage-mq role
        url = over[name]["environment"][ENV_REDIS_URL]
        check_redis_url(url)
        where = parse_sentinel_url(url)
        assert where.service == "sage" and [host for host, _port in where.sentinels] == sentinels
        assert set(over[name]["depends_on"]) == set(sentinels)
    for name in sentinels:
        script = over[name]["command"][-1]
        assert over[name]["hostname"] == name
        assert "'sentinel monitor sage redis 6379 2'" in script  # a quorum of two of three
        assert "sentinel announce-hostnames yes" in script and "exec redis-sentinel" in script


def test_the_sentinel_override_keeps_both_copies_in_append_only_files() -> None:
    base, over = _compose()["services"], _sentinel_override()["services"]
    primary, replica = over["redis"]["command"], over["redis-replica"]["command"]
    assert primary[: len(base["redis"]["command"])] == base["redis"]["command"]
    assert replica[replica.index("--replicaof") + 1 :][:2] == ["redis", "6379"]
    assert replica[replica.index("--appendonly") + 1] == "yes"
    assert "redis-replica-data" in _sentinel_override()["volumes"]
