"""Fuzzing the parsers of what a device reads from files: manifest.json, manifest.sig, local.json, recipes.

Each test runs a fixed (derandomized) set of hostile inputs in a few seconds; bench/fuzz.py runs the same targets
for as long as asked. Every input that ever broke a parser is kept below as a regression test.
"""

from __future__ import annotations

import fuzz_targets as targets
import pytest
from fuzz_strategies import json_inputs, mutated
from hypothesis import given, settings

from edgepack.runtime.errors import EdgepackError

SEEDS = targets.seeds()
SUITE = settings(max_examples=200, deadline=2000, derandomize=True, database=None)


@SUITE
@given(json_inputs(SEEDS["manifest"]))
def test_manifest_parser_refuses_in_one_line_and_round_trips(data):
    targets.manifest(data)


@SUITE
@given(json_inputs(SEEDS["signature"]))
def test_signature_check_refuses_in_one_line(data):
    targets.signature(data)


@SUITE
@given(json_inputs(SEEDS["local_config"]))
def test_local_config_parser_refuses_in_one_line(data):
    targets.local_config(data)


@pytest.fixture(scope="module")
def recipe_load(tmp_path_factory) -> targets.RecipeLoad:
    return targets.RecipeLoad(tmp_path_factory.mktemp("recipe"))


@settings(SUITE, max_examples=150)
@given(data=mutated(SEEDS["recipe"]))
def test_recipe_parser_refuses_in_one_line(recipe_load, data):
    recipe_load(data)


# ---- what fuzzing found, kept -----------------------------------------------------------------------------------

NESTED = b"[" * 5000 + b"]" * 5000


@pytest.mark.parametrize("data", [
    b'{"format_version": 1, "x": ' + NESTED + b"}",
    b'{"format_version": 1, "models": [{"quality": ' + NESTED + b"}]}",
], ids=["unknown field", "free-form field"])
def test_deeply_nested_manifest_is_refused(data):
    # msgspec follows nesting up to Python's recursion limit, then raised RecursionError out of the parser.
    with pytest.raises(EdgepackError, match="manifest.json: JSON nested too deeply"):
        targets.Manifest.from_json(data)


def test_deeply_nested_local_config_is_refused():
    with pytest.raises(EdgepackError, match="local.json: JSON nested too deeply; delete it"):
        targets.parse_local_config(b'{"measured": {"a": ' + NESTED + b"}}", "local.json")


def test_signature_with_non_ascii_base64_is_refused():
    # base64.b64decode raises a plain ValueError (not binascii.Error) for a str that is not ASCII.
    public = targets.KEY.public_key()
    sig = b'{"key": "ed25519:0", "manifest_sha256": "0", "signature": "\\u00e9"}'
    with pytest.raises(EdgepackError, match="manifest.sig is not a signature"):
        targets.signatures.verify(b"{}", sig, {targets.signatures.key_id(public): public}, "bundle")


@pytest.mark.parametrize("text", [b"board = " + b"[" * 3000 + b"]" * 3000,
                                  b'[models.a]\nsource = "base.gguf"\nquant = ' + b"{a=" * 2000 + b"1" + b"}" * 2000],
                         ids=["arrays", "inline tables"])
def test_deeply_nested_recipe_is_refused(recipe_load, text):
    # tomllib parses nesting recursively: RecursionError escaped from recipe.load.
    recipe_load.path.write_bytes(text)
    with pytest.raises(EdgepackError, match="not valid TOML \\(nested too deeply\\)"):
        targets.load_recipe(recipe_load.path)


def test_deeply_nested_tools_file_is_refused(recipe_load, tmp_path):
    (tmp_path / "base.gguf").write_bytes(b"GGUF")
    (tmp_path / "tools.json").write_text("[" * 5000 + "]" * 5000)
    recipe = tmp_path / "edgepack.toml"
    recipe.write_text('[models.base]\nsource = "base.gguf"\n[agents.a]\nmodel = "base"\ntools = "tools.json"\n')
    with pytest.raises(EdgepackError, match="agents.a.tools: .*not readable JSON \\(nested too deeply\\)"):
        targets.load_recipe(recipe)
