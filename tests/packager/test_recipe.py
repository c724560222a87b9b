"""An agent's tools in a recipe: inline or from a JSON file, checked by the one tool schema, kept in the manifest."""

from __future__ import annotations

import json

import pytest
from tiny_model import write_tiny_llama

from edgepack.packager import recipe as recipe_mod
from edgepack.packager.errors import PackagerError

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
HEAD = "[models.base]\nsource = 'base.gguf'\n[agents.a]\nmodel = 'base'\n"


@pytest.fixture
def project(tmp_path):
    write_tiny_llama(tmp_path / "base.gguf")
    (tmp_path / "tools.json").write_text(json.dumps([WEATHER]))
    return tmp_path


def load(project, text: str):
    path = project / "edgepack.toml"
    path.write_text(text)
    return recipe_mod.load(path)


def test_tools_from_a_json_file_and_inline_are_the_same_tools(project):
    from_file = load(project, HEAD + "tools = 'tools.json'\ntool_choice = 'get_weather'\n").agents[0]
    inline = load(project, HEAD + """tool_choice = "required"
[[agents.a.tools]]
type = "function"
[agents.a.tools.function]
name = "get_weather"
description = "Weather of a city"
[agents.a.tools.function.parameters]
type = "object"
required = ["city"]
[agents.a.tools.function.parameters.properties.city]
type = "string"
""").agents[0]
    assert from_file.tools == inline.tools
    assert from_file.tools[0].function.parameters == WEATHER["function"]["parameters"]
    assert (from_file.tool_choice, inline.tool_choice) == ("get_weather", "required")


@pytest.mark.parametrize(("text", "message"), [
    ("tool_choice = 'sometimes'\n", "agents.a: agent 'a': tool_choice: expected auto, none, required"),
    ("tools = 'missing.json'\n", "agents.a.tools: expected an existing file"),
    ("tools = 'base.gguf'\n", "agents.a.tools: "),
    ("tools = [{ type = 'function', function = { name = 'has space' } }]\n", "agents.a.tools[0].function.name"),
    ("tools = [{ type = 'function', function = { name = 'f', colour = 1 } }]\n",
     "agents.a.tools[0].function: unknown field colour"),
    ("tools = [{ function = { name = 'f' } }, { function = { name = 'f' } }]\n", "expected unique function names"),
])
def test_a_bad_tool_declaration_is_refused_naming_it(project, text, message):
    with pytest.raises(PackagerError) as err:
        load(project, HEAD + text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_model_or_adapter_source_may_be_a_directory_of_its_kind(project):
    (project / "ckpt").mkdir()
    (project / "ckpt" / "config.json").write_text("{}")
    (project / "peft").mkdir()
    (project / "peft" / "adapter_config.json").write_text("{}")
    recipe = load(project, "[models.m]\nsource = 'ckpt'\n[adapters.x]\nsource = 'peft'\nbase = 'm'\n")
    assert recipe.models[0].source == project / "ckpt"
    assert recipe.adapters[0].source == project / "peft"


@pytest.mark.parametrize(("text", "message"), [
    ("[models.m]\nsource = 'peft'\n", "models.m.source: expected a Hugging Face checkpoint directory (with "
                                      "config.json), got 'peft'"),
    ("[models.m]\nsource = 'base.gguf'\n[adapters.x]\nsource = 'ckpt'\nbase = 'm'\n",
     "adapters.x.source: expected a PEFT LoRA adapter directory (with adapter_config.json), got 'ckpt'"),
    ("[models.m]\nsource = 'nothing'\n", "models.m.source: expected an existing file or a Hugging Face checkpoint "
                                         "directory, got 'nothing'"),
])
def test_a_directory_of_the_wrong_kind_is_refused_naming_the_key(project, text, message):
    (project / "ckpt").mkdir()
    (project / "ckpt" / "config.json").write_text("{}")
    (project / "peft").mkdir()
    (project / "peft" / "adapter_config.json").write_text("{}")
    with pytest.raises(PackagerError) as refused:
        load(project, text)
    assert str(refused.value) == f"{project / 'edgepack.toml'}: {message}"
