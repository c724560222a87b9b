"""The one schema layer: each border's input is refused with the bad field's path; sampling is defined once."""

import json
import tarfile
from importlib import resources

import pytest

from edgepack.runtime.boards import list_boards, parse_profile
from edgepack.runtime.bundle_format import Manifest
from edgepack.runtime.errors import EdgepackError
from edgepack.runtime.openai_api import ApiError, parse_chat, parse_completion
from edgepack.runtime.sampling import SAMPLING_KEYS, Sampling, SamplingParams

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
VALUES = {"temperature": 0.5, "top_p": 0.9, "top_k": 7, "min_p": 0.1, "repeat_penalty": 1.1,
          "frequency_penalty": 0.5, "presence_penalty": -0.5, "seed": 42, "max_tokens": 9}


def manifest_doc(tiny_bundle) -> dict:
    with tarfile.open(tiny_bundle) as archive:
        return json.loads(archive.extractfile("manifest.json").read())


def chat(doc: dict):
    return parse_chat(json.dumps(doc).encode())


def test_every_sampling_key_reaches_the_engine_from_the_manifest_and_the_request(tiny_bundle):
    assert set(VALUES) == set(SAMPLING_KEYS)
    doc = manifest_doc(tiny_bundle)
    doc["agents"] = [{"name": "a", "model": doc["models"][0]["name"], "sampling": VALUES}]
    agent = Manifest.from_json(json.dumps(doc).encode()).agents[0]
    from_manifest = Sampling.layered(1, agent.sampling)
    from_request = Sampling.layered(1, chat({**CHAT, **VALUES}).sampling)
    for key, value in VALUES.items():
        if key != "max_tokens":  # decided by the server from the prompt's length
            assert getattr(from_manifest, key) == value == getattr(from_request, key), key


def test_request_values_win_over_the_agents_and_unset_ones_fall_through():
    agent = SamplingParams(temperature=0.2, top_k=5)
    sampling = Sampling.layered(16, agent, SamplingParams(temperature=0.9))
    assert (sampling.temperature, sampling.top_k, sampling.top_p) == (0.9, 5, Sampling(1).top_p)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["agents"][0]["sampling"].update(top_k=2.5), "agents[0].sampling.top_k: expected int"),
    (lambda d: d["agents"][0]["sampling"].update(temprature=1), "agents[0].sampling: unknown field temprature"),
    (lambda d: d["agents"][0]["sampling"].update(temperature=True), "agents[0].sampling.temperature: expected float"),
    (lambda d: d["agents"][0]["sampling"].update(top_p=3), "agents[0].sampling.top_p: expected float <= 1.0"),
    (lambda d: d["agents"][0].update(tier="yolo"), "agents[0].tier"),
    (lambda d: d["agents"][0].update(model="nope"), "agents[0].model: expected the name of a model"),
    (lambda d: d["models"][0].update(colour="red"), "models[0]: unknown field colour"),
    (lambda d: d["models"][0].update(segments=["sha256-" + "0" * 64]), "models[0].segments[0]: expected a digest"),
    (lambda d: d["models"][0].update(segments=["sha256-xyz"]), "models[0].segments[0]: expected 'sha256-"),
    (lambda d: d["runtime"].update(n_ctx=8), "runtime.n_ctx: expected int >= 16"),
    (lambda d: d.update(name="../etc"), "name: expected a name of letters"),
    (lambda d: d.pop("models"), "missing required field models"),
])
def test_a_bad_manifest_field_is_named(tiny_bundle, edit, message):
    doc = manifest_doc(tiny_bundle)
    doc["agents"] = [{"name": "a", "model": doc["models"][0]["name"], "sampling": {"temperature": 0.1}}]
    edit(doc)
    with pytest.raises(EdgepackError) as err:
        Manifest.from_json(json.dumps(doc).encode(), "bundle.edgepack: manifest.json")
    assert str(err.value).startswith("bundle.edgepack: manifest.json: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_newer_format_is_refused_by_its_version_before_its_fields(tiny_bundle):
    doc = manifest_doc(tiny_bundle)
    doc.update(format_version=2, something_new={"x": 1})
    with pytest.raises(EdgepackError, match="format_version 2 is not supported"):
        Manifest.from_json(json.dumps(doc).encode())


@pytest.mark.parametrize(("body", "param"), [
    ({**CHAT, "top_k": 2.5}, "top_k"),
    ({**CHAT, "temperature": "hot"}, "temperature"),
    ({**CHAT, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({**CHAT, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"model": "tiny"}, None),  # no messages: the whole body is wrong
])
def test_a_bad_request_field_is_a_400_naming_it(body, param):
    with pytest.raises(ApiError) as err:
        chat(body)
    assert err.value.status == 400 and err.value.param == param, err.value.message
    assert "messages" in err.value.message if param is None else param in err.value.message


def test_unknown_openai_fields_are_ignored_and_known_unsupported_ones_refused():
    request = chat({**CHAT, "user": "u-1", "metadata": {"k": "v"}, "store": False, "temperature": 0})
    assert request.sampling.temperature == 0 and request.pairs() == [("user", "hi")]
    with pytest.raises(ApiError) as err:
        chat({**CHAT, "n": 9})  # beyond the 8 choices a request may ask for
    assert err.value.status == 400 and err.value.param == "n"
    with pytest.raises(ApiError) as err:
        parse_completion(json.dumps({"prompt": "x", "echo": True}).encode())
    assert err.value.param == "echo"


def test_board_profiles_parse_and_a_typo_is_refused(tmp_path):
    assert {b.name for b in list_boards()} >= {"rpi4", "rpi5", "jetson-orin-nano", "x86-laptop"}
    rpi5 = next(b for b in list_boards() if b.name == "rpi5")
    text = tmp_path / "x.toml"
    original = (resources.files("edgepack.boards") / "rpi5.toml").read_text()
    text.write_text(original.replace("n_ctx = 4096", "n_ctx = 4096\nthreds = 4"))
    with pytest.raises(EdgepackError) as err:
        parse_profile(text)
    assert str(err.value) == f"{text}: unknown field threds"
    text.write_text(original.replace('kind = "performance"', 'kind = "fast"'))
    with pytest.raises(EdgepackError, match=r"cores\[0\]\.kind"):
        parse_profile(text)
    text.write_text(original)
    assert parse_profile(text) == rpi5


def test_a_name_with_a_final_newline_is_refused():
    """Found by the fuzzing: the pattern ended in "$", which lets "planner\\n" through (msgspec searches)."""
    import msgspec
    import pytest

    from edgepack.runtime.errors import EdgepackError
    from edgepack.runtime.schema import Name, convert

    class Doc(msgspec.Struct):
        name: Name

    assert convert({"name": "planner"}, Doc, "recipe.toml").name == "planner"
    with pytest.raises(EdgepackError, match=r"recipe.toml: name: expected a name of letters"):
        convert({"name": "planner\n"}, Doc, "recipe.toml")
