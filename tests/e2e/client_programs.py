"""The example programs of the non-Python clients under clients/: what each needs, how `make`
builds it, and how to run it.

Every example takes the same flags (--target, --api-key, --tls, --ca, --model, --max-tokens),
streams a chat reply, prints "finish_reason: ..." and "usage: ..." lines, then embeds two texts
("embed: ..."); a failed call prints "error: CODE: message" on stderr and exits with 1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# A build can take minutes on a loaded machine (C++ compiles the generated stubs).
BUILD_TIMEOUT_S = 900


@dataclass(frozen=True)
class ClientProgram:
    """One language's example program."""

    lang: str
    make_target: str
    # Executables that must be on PATH and files that must exist before building.
    tools: tuple[str, ...]
    files: tuple[str, ...]
    # The built example, as a command from the repository root.
    command: tuple[str, ...]
    # The `make` target that builds and runs the client's unit tests.
    test_target: str

    def missing(self) -> list[str]:
        """What of the toolchain is not installed."""
        absent = [tool for tool in self.tools if shutil.which(tool) is None]
        return absent + [path for path in self.files if not Path(path).exists()]


TYPESCRIPT = ClientProgram(
    lang="typescript",
    make_target="client-ts",
    tools=("node", "npm"),
    files=(),
    command=("node", "clients/typescript/dist/examples/chat.js"),
    test_target="test-client-ts",
)
GO = ClientProgram(
    lang="go",
    make_target="client-go",
    tools=("go", "protoc-gen-go", "protoc-gen-go-grpc"),
    files=(
        "/usr/share/gocode/src/google.golang.org/grpc",
        "/usr/share/gocode/src/google.golang.org/protobuf",
    ),
    command=("clients/go/bin/example",),
    test_target="test-client-go",
)
CPP = ClientProgram(
    lang="cpp",
    make_target="client-cpp",
    tools=("g++", "cmake", "pkg-config", "protoc", "grpc_cpp_plugin"),
    files=("/usr/include/grpcpp/grpcpp.h",),
    command=("clients/cpp/build/chat_example",),
    test_target="test-client-cpp",
)
JAVA = ClientProgram(
    lang="java",
    make_target="client-java",
    tools=("javac", "java", "protoc", "grpc_java_plugin"),
    files=(
        "/usr/share/java/grpc-netty.jar",
        "/usr/share/java/protobuf.jar",
        "/usr/share/java/netty-tcnative.jar",
        "/usr/share/java/junit4.jar",
    ),
    command=("clients/java/build/chat-example",),
    test_target="test-client-java",
)
PROGRAMS = (TYPESCRIPT, GO, CPP, JAVA)


def build(program: ClientProgram) -> None:
    """Build the example with `make`; skip when its toolchain is not installed, except in CI,
    where .ci/run installs every toolchain and a missing one is a failure."""
    missing = program.missing()
    if missing:
        reason = (
            f"the {program.lang} toolchain is missing ({', '.join(missing)}): "
            "run `make toolchains` (Debian packages, as root)"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    result = _make(program.make_target)
    if result.returncode != 0:
        pytest.fail(
            f"make {program.make_target} failed ({result.returncode}):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )


def unit_tests(program: ClientProgram) -> subprocess.CompletedProcess[str]:
    """Run the client's unit tests with `make` (built already by `build`)."""
    return _make(program.test_target)


def _make(target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )


def run(
    program: ClientProgram, *args: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the built example with `args`; returns its exit code and output."""
    return subprocess.run(
        [*program.command, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
