"""@tool: schemas from signatures and docstrings, argument validation, definition errors."""

from typing import Literal

import pytest

from tools.sdk import ToolArgumentError, ToolDefinitionError, tool


@tool
def sample(
    text: str,
    count: int = 2,
    scale: float = 1.0,
    mode: Literal["a", "b"] = "a",
    tags: list[str] | None = None,
    flag: bool = False,
) -> str:
    """Do a sample thing.

    More detail for the model.

    Args:
        text: The text to use,
            over two lines.
        count: How many.
        scale: A factor.
        mode: Which mode.
        tags: Optional labels.
        flag: A switch.
    """
    return text * count


def test_schema_is_derived_from_signature_and_docstring():
    s = sample.schema()
    assert s["type"] == "function"
    f = s["function"]
    assert f["name"] == "sample"
    assert f["description"] == "Do a sample thing.\n\nMore detail for the model."
    props = f["parameters"]["properties"]
    assert props["text"] == {"type": "string", "description": "The text to use, over two lines."}
    assert props["count"] == {"type": "integer", "description": "How many.", "default": 2}
    assert props["scale"]["type"] == "number"
    assert props["mode"]["enum"] == ["a", "b"] and props["mode"]["type"] == "string"
    assert props["tags"]["type"] == ["array", "null"] and props["tags"]["items"] == {
        "type": "string"
    }
    assert props["flag"]["type"] == "boolean"
    assert f["parameters"]["required"] == ["text"]


def test_validation_fills_defaults_and_accepts_json_text():
    assert sample.validate({"text": "x"}) == {
        "text": "x", "count": 2, "scale": 1.0, "mode": "a", "tags": None, "flag": False,
    }  # fmt: skip
    assert sample.validate('{"text": "x", "scale": 3, "tags": ["p"]}')["scale"] == 3.0
    assert sample("ab", 2) == "abab"  # still callable as a function


@pytest.mark.parametrize("args, message", [
    ("{not json", "not valid JSON"),
    ([1, 2], "must be a JSON object"),
    ({}, "missing required argument 'text'"),
    ({"text": "x", "colour": 1}, "unknown argument 'colour'; allowed: text, count"),
    ({"text": 5}, "argument 'text' must be a string, got 5 (int)"),
    ({"text": "x", "count": True}, "argument 'count' must be an integer, got true (bool)"),
    ({"text": "x", "count": 1.5}, "argument 'count' must be an integer"),
    ({"text": "x", "mode": "c"}, "must be one of 'a', 'b', got 'c'"),
    ({"text": "x", "tags": ["ok", 3]}, "argument 'tags'[1] must be a string"),
    ({"text": None}, "argument 'text' must not be null"),
])  # fmt: skip
def test_bad_calls_get_a_message_for_the_model(args, message):
    with pytest.raises(ToolArgumentError) as info:
        sample.validate(args)
    assert message in str(info.value)
    assert str(info.value).startswith("sample: ")


def test_definition_errors_are_caught_at_decoration():
    def bare(x: int) -> int:
        return x

    with pytest.raises(ToolDefinitionError, match="needs a docstring"):
        tool(bare)

    def untyped(x):
        """Doc.

        Args:
            x: thing.
        """

    with pytest.raises(ToolDefinitionError, match="no type hint"):
        tool(untyped)

    def undocumented(x: int) -> int:
        """Doc without args."""

    with pytest.raises(ToolDefinitionError, match="not described under 'Args:'"):
        tool(undocumented)

    def weird(x: dict) -> int:
        """Doc.

        Args:
            x: thing.
        """

    with pytest.raises(ToolDefinitionError, match="has no JSON schema"):
        tool(weird)

    def two(a: str, b: str) -> str:
        """Doc.

        Args:
            a: one.
            b: two.
        """

    with pytest.raises(ToolDefinitionError, match="one string argument"):
        tool(two, kind="code")
    with pytest.raises(ToolDefinitionError, match="must match"):
        tool(two, name="bad name")


@pytest.mark.parametrize("text", [
    '{"text": "x", "scale": ' + "9" * 5000 + "}",  # int too long for Python's int parser
    "[" * 100000,  # nesting deep enough to exhaust the JSON parser's recursion
    '{"text": "x", "scale": NaN}',
    '{"text": "x", "scale": Infinity}',
    '{"text": "x", "scale": 1e400}',
])  # fmt: skip
def test_hostile_json_is_a_model_error_not_a_trainer_exception(text):
    with pytest.raises(ToolArgumentError):
        sample.validate(text)
