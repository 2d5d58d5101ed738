"""Error messages stay short whatever a client sends: quoted values and whole messages are cut."""

from __future__ import annotations

from server.errors import (
    MESSAGE_MAX_CHARS,
    QUOTE_MAX_CHARS,
    InvalidArgumentError,
    NotFoundError,
    UnsupportedMediaTypeError,
    clipped,
    quoted,
    unknown_model,
)


def test_short_strings_are_quoted_whole() -> None:
    assert quoted("user") == "'user'"
    assert quoted("x" * QUOTE_MAX_CHARS) == repr("x" * QUOTE_MAX_CHARS)


def test_long_strings_are_cut_and_say_how_long_they_were() -> None:
    text = quoted("m" * 200_000)
    assert text == repr("m" * QUOTE_MAX_CHARS) + "... (200000 characters)"


def test_other_values_print_only_when_small() -> None:
    assert quoted(None) == "None"
    assert quoted(True) == "True"
    assert quoted(1.5) == "1.5"
    assert quoted(42) == "42"
    # Printing a 5000-digit integer raises in Python (and nested values can recurse too deep).
    assert quoted(10**5000) == "a value of type int"
    assert quoted({"a": [1, 2]}) == "a value of type dict"
    assert quoted([[[]]]) == "a value of type list"


def test_messages_are_cut_at_the_backstop_length() -> None:
    assert clipped("short") == "short"
    long = "y" * 10_000
    cut = clipped(long)
    assert cut.startswith("y" * MESSAGE_MAX_CHARS)
    assert cut.endswith(f"... (message cut at {MESSAGE_MAX_CHARS} characters)")
    error = InvalidArgumentError("invalid request: " + long)
    assert len(error.message) < MESSAGE_MAX_CHARS + 50
    assert str(error) == error.message


def test_unknown_model_quotes_the_id_cut_short() -> None:
    error = unknown_model("z" * 50_000, ["a", "b"])
    assert isinstance(error, NotFoundError)
    assert "(50000 characters); available models: a, b" in error.message
    assert len(error.message) < 250


def test_unsupported_media_type_is_a_415_invalid_argument() -> None:
    error = UnsupportedMediaTypeError("JSON only")
    assert error.http_status == 415
    assert error.grpc_status == "INVALID_ARGUMENT"
