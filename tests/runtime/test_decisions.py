"""Decision agreement between a live answer and a candidate's: text, first token, tool calls, JSON."""

from __future__ import annotations

from edgepack.runtime.decisions import Answer, Call, compare, json_document
from edgepack.runtime.tool_calls import ToolCall


def test_plain_text_agrees_only_when_exact():
    same = compare(Answer("Paris.", first_token=42), Answer("Paris.", first_token=42))
    assert same.agrees and same.exact and same.first_token
    assert (same.tool_name, same.tool_args, same.json) == (None, None, None)
    other = compare(Answer("Paris.", first_token=42), Answer("Paris, France.", first_token=42))
    assert not other.agrees and not other.exact and other.first_token  # same first token, another decision


def test_first_token_takes_ids_or_pieces_and_is_unknown_without_both():
    assert compare(Answer("a", first_token="Yes"), Answer("a", first_token="No")).first_token is False
    assert compare(Answer("a", first_token=7), Answer("a")).first_token is None


def test_tool_calls_agree_on_parsed_arguments_whatever_their_spelling():
    live = Answer("", [Call("get_weather", '{"city": "Paris", "days": 3, "units": {"temp": "C"}}')])
    candidate = Answer("", [Call("get_weather", '{"units":{"temp":"C"},"days":3.0,"city":"Paris"}')])
    result = compare(live, candidate)
    assert result.agrees and result.tool_name and result.tool_args
    assert not result.exact  # the text differs, the decision does not


def test_tool_calls_from_the_parser_are_accepted_and_call_ids_do_not_matter():
    live = Answer("", [ToolCall("call_aaa", "search", '{"q": "edge"}')])
    candidate = Answer("", [ToolCall("call_bbb", "search", '{"q": "edge"}')])
    assert compare(live, candidate).exact and compare(live, candidate).agrees


def test_another_argument_value_or_type_is_another_decision():
    live = Answer("", [Call("set", '{"on": true, "level": 1}')])
    for arguments in ('{"on": true, "level": 2}', '{"on": 1, "level": 1}', '{"on": true, "level": "1"}',
                      '{"on": true}'):
        result = compare(live, Answer("", [Call("set", arguments)]))
        assert result.tool_name and not result.tool_args and not result.agrees, arguments


def test_another_function_disagrees_on_name_and_arguments():
    result = compare(Answer("", [Call("a", "{}")]), Answer("", [Call("b", "{}")]))
    assert (result.tool_name, result.tool_args, result.agrees) == (False, False, False)


def test_a_call_against_a_text_answer_disagrees():
    result = compare(Answer("", [Call("a", "{}")]), Answer("I cannot help with that."))
    assert (result.tool_name, result.tool_args, result.json, result.agrees) == (False, False, None, False)


def test_parallel_calls_in_another_order_are_the_same_decision():
    a, b = Call("read", '{"path": "/a"}'), Call("read", '{"path": "/b"}')
    result = compare(Answer("", [a, b]), Answer("", [b, a]))
    assert result.agrees and not result.exact
    assert not compare(Answer("", [a, b]), Answer("", [a])).agrees


def test_unparseable_arguments_compare_as_text():
    cut = Call("a", '{"x": [1, 2')  # cut off by max_tokens
    assert compare(Answer("", [cut]), Answer("", [Call("a", ' {"x": [1, 2 ')])).agrees
    assert not compare(Answer("", [cut]), Answer("", [Call("a", '{"x": [1, 2]}')])).agrees


def test_content_around_calls_does_not_change_the_decision():
    result = compare(Answer("Let me look.", [Call("a", "{}")]), Answer("Looking it up:", [Call("a", "{}")]))
    assert result.agrees and not result.exact


def test_json_answers_agree_as_values():
    live = Answer('{"action": "buy", "qty": 10, "tags": ["a", "b"]}')
    candidate = Answer('```json\n{\n  "tags": ["a", "b"],\n  "qty": 1e1,\n  "action": "buy"\n}\n```')
    result = compare(live, candidate)
    assert result.json and result.agrees and not result.exact and result.tool_name is None
    assert not compare(live, Answer('{"action": "buy", "qty": 10, "tags": ["b", "a"]}')).agrees  # arrays keep order
    broken = compare(live, Answer('{"action": "buy", "qty": 10'))
    assert broken.json is False and not broken.agrees


def test_json_documents_are_objects_or_arrays_of_strict_json():
    assert json_document("42") is None and json_document("yes") is None
    assert json_document('{"x": NaN}') is None
    assert json_document("[1, 2]") == json_document("[1.0, 2e0]")
    assert json_document("[true]") != json_document("[1]")
    assert json_document("[0.1]") != json_document("[0.1000000000000000000000000000001]")  # no rounding
    assert json_document("[" * 100_000) is None
