"""Pure conversions between MCP tools and what LLM providers accept: names, schemas and results.

Kept apart from the connection code in ``agent.tools.mcp`` so the rules are easy to read and test.
Providers are stricter than MCP: OpenAI and Anthropic both want tool names matching
``^[a-zA-Z0-9_-]{1,64}$`` and an object schema at the top; models read results as text only.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import json
from typing import Any

from mcp import types

from agent.tools.names import sanitize_name

MAX_TOOL_NAME = 64
# Top-level keywords OpenAI refuses in function parameters ("must be type object, no oneOf/anyOf/..."):
_TOP_LEVEL_FORBIDDEN = ("oneOf", "anyOf", "allOf", "not", "enum", "const")


def tool_name(server: str, tool: str, *, force_hash: bool = False) -> str:
    """The provider-safe name ``<server>__<tool>``.

    Too long a name keeps its start and gets a short hash of the full original, so it stays stable
    across restarts and distinct from its neighbours; ``force_hash`` does the same for a name that
    collides with another tool's after sanitizing.
    """
    raw = f"{server}__{tool}"
    name = sanitize_name(raw)
    if force_hash or len(name) > MAX_TOOL_NAME:
        digest = hashlib.sha1(raw.encode("utf-8")).hexdigest()[:8]
        name = f"{name[: MAX_TOOL_NAME - len(digest) - 1]}_{digest}"
    return name


def normalize_input_schema(schema: dict[str, Any] | None) -> dict[str, Any]:
    """An input schema both OpenAI and Anthropic accept, keeping everything they do accept.

    MCP allows any JSON Schema; providers want ``type: "object"`` with ``properties`` at the top, no
    top-level combinators, no ``$schema``, and (OpenAI) an ``items`` on every array.
    """
    result: dict[str, Any] = copy.deepcopy(schema) if isinstance(schema, dict) else {}
    result.pop("$schema", None)
    for key in _TOP_LEVEL_FORBIDDEN:
        result.pop(key, None)
    declared = result.get("type")
    if (
        declared != "object"
        and not (isinstance(declared, list) and "object" in declared)
        and declared is not None
    ):
        result = {}  # not an object at all: the tool takes no arguments we could describe
    result["type"] = "object"
    if not isinstance(result.get("properties"), dict):
        result["properties"] = {}
    required = result.get("required")
    if required is not None and not (
        isinstance(required, list) and all(isinstance(r, str) for r in required)
    ):
        del result["required"]
    _add_missing_items(result)
    return result


def _add_missing_items(node: Any) -> None:
    """Give every array schema an ``items`` (OpenAI rejects arrays without one)."""
    if isinstance(node, dict):
        kind = node.get("type")
        if (kind == "array" or (isinstance(kind, list) and "array" in kind)) and "items" not in node:
            node["items"] = {}
        for value in node.values():
            _add_missing_items(value)
    elif isinstance(node, list):
        for value in node:
            _add_missing_items(value)


def _decoded_size(data: str) -> str:
    """The size of base64 data, as the placeholder states it (models need no exact count)."""
    try:
        return f"{len(base64.b64decode(data, validate=False))} bytes"
    except (binascii.Error, ValueError):
        return f"{len(data)} characters of base64"


def _binary_placeholder(kind: str, mime_type: str | None, data: str) -> str:
    return f"[{kind}: {mime_type or 'unknown type'}, {_decoded_size(data)}; binary content omitted]"


def block_to_text(block: Any) -> tuple[str, bool]:
    """One content block as text, and whether it carried real text (rather than a placeholder)."""
    if isinstance(block, types.TextContent):
        return block.text, True
    if isinstance(block, types.ImageContent):
        return _binary_placeholder("image", block.mime_type, block.data), False
    if isinstance(block, types.AudioContent):
        return _binary_placeholder("audio", block.mime_type, block.data), False
    if isinstance(block, types.EmbeddedResource):
        resource = block.resource
        if isinstance(resource, types.TextResourceContents):
            return resource.text, True
        return _binary_placeholder(f"resource {resource.uri}", resource.mime_type, resource.blob), False
    if isinstance(block, types.ResourceLink):
        label = block.title or block.name
        return f"[resource link: {label} <{block.uri}>]", False
    kind = getattr(block, "type", type(block).__name__)
    return f"[{kind} content omitted]", False


def result_to_text(result: types.CallToolResult) -> str:
    """A tool result as the text a model reads.

    Text blocks are joined with newlines; binary blocks become short placeholders saying what was
    there; structured content is shown as JSON when no block carried text (servers usually repeat
    it as text, and showing both would double the tokens).
    """
    parts: list[str] = []
    has_text = False
    for block in result.content:
        text, is_text = block_to_text(block)
        parts.append(text)
        has_text = has_text or is_text
    if not has_text and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False, default=str))
    if not parts:
        return "(the tool returned no content)"
    return "\n".join(parts)
