"""The embedding routes' fast float rendering prints exactly what json.dumps prints."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from glm.v1 import glm_service_pb2 as pb
from server.service.json_api import legacy, openai
from server.service.json_api.common import _MARK, FloatList, dumps


def plain(payload: Any) -> bytes:
    """The bytes before the fast path: FloatList values as plain lists, through json.dumps."""

    def unwrap(value: Any) -> Any:
        if isinstance(value, FloatList):
            return list(value.values)
        if isinstance(value, dict):
            return {k: unwrap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [unwrap(v) for v in value]
        return value

    return json.dumps(unwrap(payload), ensure_ascii=False, separators=(",", ":")).encode()


def float32_values(seed_: int, count: int) -> list[float]:
    """Random float32 values over every magnitude, as doubles (what protobuf's float gives)."""
    rng = np.random.default_rng(seed_)
    bits = rng.integers(0, 2**32, count, dtype=np.uint64).astype(np.uint32)
    with np.errstate(invalid="ignore"):  # some bit patterns are signalling NaNs
        return bits.view(np.float32).astype(np.float64).tolist()


def edges() -> list[float]:
    """Where Python's repr switches to exponents (1e-4, 1e16), both sides, and the specials."""
    values = [0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf")]
    for edge in (1e-4, 1e16, 1e-5, 1e15, 1.0, 0.1):
        x = np.float32(edge)
        for v in (np.nextafter(x, np.float32(0)), x, np.nextafter(x, np.float32(np.inf))):
            values += [float(v), -float(v)]
    tiny = np.finfo(np.float32)
    values += [float(tiny.tiny), float(tiny.smallest_subnormal), float(tiny.max), -float(tiny.max)]
    return values


def test_edges_render_as_json_dumps() -> None:
    values = edges()
    assert FloatList(values).to_json() == plain(values)
    for value in values:
        assert FloatList([value]).to_json() == plain([value])


@pytest.mark.parametrize("seed_", range(20))
def test_random_float32_render_as_json_dumps(seed_: int) -> None:
    values = float32_values(seed_, 5000)
    assert FloatList(values).to_json() == plain(values)


@pytest.mark.parametrize("scale", [1e-3, 0.05, 1.0, 30.0])
def test_embedding_like_vectors_render_as_json_dumps(scale: float) -> None:
    rng = np.random.default_rng(int(scale * 1000))
    for _ in range(50):
        vector = (rng.standard_normal(384) * scale).astype(np.float32)
        embedding = pb.Embedding(values=vector.tolist())
        assert FloatList(embedding.values).to_json() == plain(list(embedding.values))


def response(rows: int) -> pb.EmbedResponse:
    rng = np.random.default_rng(rows)
    vectors = (rng.standard_normal((rows, 384)) * 0.05).astype(np.float32)
    if rows:
        vectors[0, :3] = [1e-7, -0.0, 0.0]  # below 1e-4: the slow path, spliced in
    return pb.EmbedResponse(
        data=[pb.Embedding(values=v.tolist(), index=i) for i, v in enumerate(vectors)],
        model="all-minilm-l6-v2",
        object="embedding",
        usage=pb.Usage(prompt_tokens=7, total_tokens=7),
        dimensions=384,
    )


@pytest.mark.parametrize("rows", [0, 1, 3])
def test_both_embedding_routes_render_as_before(rows: int) -> None:
    for payload in (
        legacy.embedding(response(rows)),
        openai.embeddings(response(rows), "float"),
        openai.embeddings(response(rows), "base64"),
    ):
        assert dumps(payload) == plain(payload)
        json.loads(dumps(payload))


def test_a_string_that_looks_like_the_mark_changes_nothing() -> None:
    payload = {"model": _MARK, "data": [FloatList([0.5, 1e-9]), FloatList([])]}
    assert dumps(payload) == plain(payload)
    assert json.loads(dumps(payload))["model"] == _MARK


def test_other_objects_are_still_refused() -> None:
    with pytest.raises(TypeError):
        dumps({"x": object()})
