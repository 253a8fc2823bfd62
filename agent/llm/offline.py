"""The offline model: a deterministic stand-in for an LLM, for demos and tests without a key or network.

It is not intelligent. It follows fixed rules over the conversation (see ``OfflineModel``) so a whole
trace (tool calls, tool results, a final answer, a reflection) can be exercised end to end, repeatably.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import anyio
import anyio.lowlevel

from agent.llm.base import ModelResponse, TextSink, ToolChoice
from agent.trace.models import FunctionCall, MessageUsage, ToolCall

EXCERPT_LIMIT = 400
DIGEST_LIMIT = 1_500
_DIGEST_EXCERPT = 120
_COMPACTION_REQUEST = re.compile(r"summari[sz]e the conversation so far", re.IGNORECASE)
_CURATION_REQUEST = re.compile(r"curate a list of lessons", re.IGNORECASE)
_LISTED_LESSON = re.compile(r"^\d+\. \[(?P<id>[^\]\s]+)\] (?P<rest>\(.*)$")
_QUESTION_WORDS = ("question", "ask", "prompt")
_LEAD_IN = re.compile(
    r"^(?:[\s:,;\-–—]+|(?:to|and|then|please|ask|asking|the host|the user|me|whether|if|about|for|"
    r"a question|question|with)\b)*",
    re.IGNORECASE,
)
_QUESTION_END = re.compile(r"(?<=\?)|[.!;\n]|,?\s+(?:and\s+)?then\b")
_PATH_WORDS = ("path", "file", "dir", "folder")
_QUERY_WORDS = ("pattern", "query", "text", "search", "regex", "keyword", "term")
_QUOTED = re.compile(r"\"([^\"]+)\"|'([^']+)'|`([^`]+)`")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.]*[A-Za-z_])")
_FOR_PHRASE = re.compile(
    r"\bfor\s+(.+?)(?=\s+(?:in|within|under|inside|from|using|with|and|then)\b|[.,;:!?\n]|$)", re.IGNORECASE
)
_ERROR_START = re.compile(r"^\s*(?:error|tool error|failed|exception|traceback)\b", re.IGNORECASE)
_WORD_EDGE = r"[A-Za-z0-9_\-]"


def _text(content: Any) -> str:
    """Message content as text (a string, or OpenAI ``{"type": "text"}`` parts)."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return str(content)


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _tool_functions(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [t.get("function", t) for t in tools if isinstance(t, dict) and t.get("function", t).get("name")]


def _named(name: str, text: str) -> int | None:
    """Where ``name`` occurs in ``text`` as a whole word (tool names may hold '_' and '-'), else None."""
    match = _mention(name, text)
    return match.start() if match else None


def _named_tools(text: str, functions: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(position, tool) for each offered tool the text names, in order of mention: full names, or an
    unambiguous part after ``__``."""
    names = {f["name"] for f in functions}
    suffixes = Counter(f["name"].rpartition("__")[2] for f in functions if "__" in f["name"])
    hits: list[tuple[int, int, dict[str, Any]]] = []
    for order, function in enumerate(functions):
        name = function["name"]
        position = _named(name, text)
        if position is None and "__" in name:
            suffix = name.rpartition("__")[2]
            if suffix and suffixes[suffix] == 1 and suffix not in names:
                position = _named(suffix, text)
        if position is not None:
            hits.append((position, order, function))
    return [(position, function) for position, _, function in sorted(hits, key=lambda h: (h[0], h[1]))]


def _segments(text: str, named: list[tuple[int, dict[str, Any]]]) -> list[str]:
    """The words meant for each named tool: from its mention to the next one (the first also gets the lead-in)."""
    starts = [0] + [position for position, _ in named[1:]]
    ends = [position for position, _ in named[1:]] + [len(text)]
    return [text[start:end] for start, end in zip(starts, ends, strict=True)]


# --- arguments from a JSON schema and the user's words ------------------------------------------------


class _Clues:
    """What the user's text offers as argument values; each value is used once."""

    def __init__(self, text: str, tool_names: list[str], keys: set[str]):
        self.text = text
        self.tool_names = tool_names
        self.explicit: dict[str, str] = {}
        if keys:  # ``name=value`` / ``name: value`` for the schema's own property names only
            alternatives = "|".join(re.escape(k) for k in sorted(keys, key=len, reverse=True))
            explicit = re.compile(
                rf"(?<![\w-])({alternatives})\s*[=:]\s*(\"[^\"]*\"|'[^']*'|[^\s,;]+)", re.IGNORECASE
            )
            for match in explicit.finditer(text):
                self.explicit.setdefault(match.group(1).lower(), match.group(2).strip("\"'"))
            text = explicit.sub(" ", text)
        self.quoted = [next(g for g in m.groups() if g is not None) for m in _QUOTED.finditer(text)]
        free = _QUOTED.sub(" ", text)
        for name in tool_names:
            free = re.sub(rf"(?<!{_WORD_EDGE}){re.escape(name)}(?!{_WORD_EDGE})", " ", free)
        tokens = [t.strip(",;:!?()[]{}<>").rstrip(".") for t in free.split()]
        self.paths = [t for t in tokens if _path_like(t)]
        for path in self.paths:
            free = free.replace(path, " ")
        self.numbers = [float(n) if "." in n else int(n) for n in _NUMBER.findall(free)]
        self.phrases = [
            m.group(1).strip().strip("\"'`") for m in _FOR_PHRASE.finditer(_QUOTED.sub(" ", free))
        ]
        self.used: set[str] = set()

    def take(self, candidates: list[str]) -> str | None:
        for value in candidates:
            if value and value not in self.used:
                self.used.add(value)
                return value
        return None


def _question(text: str, tool_names: list[str]) -> str:
    """A question from free text: what follows the tool's mention, lead-in words dropped, one sentence."""
    mentions = [(m.start(), m.end()) for name in tool_names if (m := _mention(name, text))]
    rest = text[min(mentions)[1] :] if mentions else text
    if not rest.strip(" \t\n.!?"):  # the question came before the tool's name
        rest = text
        for name in tool_names:
            rest = re.sub(rf"(?<!{_WORD_EDGE}){re.escape(name)}(?!{_WORD_EDGE})", " ", rest)
    rest = _LEAD_IN.sub("", rest.strip())
    sentence = _QUESTION_END.split(rest, maxsplit=1)[0].strip(" ,;:")
    if not sentence:
        return "What should I do next?"
    sentence = sentence[0].upper() + sentence[1:]
    return sentence if sentence.endswith("?") else sentence + "?"


def _mention(name: str, text: str) -> re.Match[str] | None:
    return re.search(rf"(?<!{_WORD_EDGE}){re.escape(name)}(?!{_WORD_EDGE})", text)


def _path_like(token: str) -> bool:
    if not token or token.startswith("-") or "://" in token:
        return False
    return "/" in token or re.search(r"[\w-]\.[A-Za-z][A-Za-z0-9]{0,7}$", token) is not None


def _resolve(schema: Any, root: dict[str, Any]) -> dict[str, Any]:
    """Follow a local ``$ref`` and pick the first non-null branch of anyOf/oneOf."""
    for _ in range(10):
        if not isinstance(schema, dict):
            return {}
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            target: Any = root
            for part in ref[2:].split("/"):
                target = target.get(part, {}) if isinstance(target, dict) else {}
            schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
            continue
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                chosen = next(
                    (o for o in options if isinstance(o, dict) and o.get("type") != "null"), options[0]
                )
                schema = {**{k: v for k, v in schema.items() if k != key}, **chosen}
                break
        else:
            return schema
    return schema if isinstance(schema, dict) else {}


def _type_of(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if isinstance(kind, str):
        return kind
    if "properties" in schema:
        return "object"
    if "items" in schema:
        return "array"
    return "string"


def _coerce(raw: str, kind: str) -> Any:
    """An explicit ``name=value`` from the text, as the schema's type, or None if it does not fit."""
    try:
        if kind == "integer":
            return int(float(raw))
        if kind == "number":
            return float(raw)
    except ValueError:
        return None
    if kind == "boolean":
        return {"true": True, "yes": True, "false": False, "no": False}.get(raw.lower())
    return raw if kind == "string" else None


def _clamp(value: float, schema: dict[str, Any], kind: str) -> Any:
    step = 1 if kind == "integer" else 0
    if isinstance(schema.get("minimum"), (int, float)):
        value = max(value, schema["minimum"])
    if isinstance(schema.get("exclusiveMinimum"), (int, float)):
        value = max(value, schema["exclusiveMinimum"] + (step or 1e-9))
    if isinstance(schema.get("maximum"), (int, float)):
        value = min(value, schema["maximum"])
    if isinstance(schema.get("exclusiveMaximum"), (int, float)):
        value = min(value, schema["exclusiveMaximum"] - (step or 1e-9))
    return int(value) if kind == "integer" else value


def _fit_string(value: str, schema: dict[str, Any]) -> str:
    if isinstance(schema.get("maxLength"), int):
        value = value[: schema["maxLength"]]
    if isinstance(schema.get("minLength"), int) and len(value) < schema["minLength"]:
        value = value + "." * (schema["minLength"] - len(value))
    return value


def _value(
    name: str, schema: Any, clues: _Clues, root: dict[str, Any], *, required: bool
) -> tuple[bool, Any]:
    """(filled?, value) for one property; optional ones only when the text clearly gives a value."""
    schema = _resolve(schema, root)
    kind = _type_of(schema)
    lowered = name.lower()
    if lowered in clues.explicit:
        if "enum" in schema:
            match = next(
                (e for e in schema["enum"] if str(e).lower() == clues.explicit[lowered].lower()), None
            )
            if match is not None:
                return True, match
        else:
            value = _coerce(clues.explicit[lowered], kind)
            if value is not None:
                return True, _fit_string(value, schema) if kind == "string" else value
    if "const" in schema:
        return required, schema["const"]
    if schema.get("enum"):
        default = schema.get("default")
        return required, default if default in schema["enum"] else schema["enum"][0]
    is_path = any(word in lowered for word in _PATH_WORDS)
    is_query = any(word in lowered for word in _QUERY_WORDS) or lowered == "q"
    if kind == "string" and required and any(word in lowered for word in _QUESTION_WORDS):
        question = clues.take(clues.quoted) or _question(clues.text, clues.tool_names)
        return True, _fit_string(question, schema)
    if kind == "string":
        found: str | None
        if is_path:
            quoted_paths = [q for q in clues.quoted if _path_like(q)]
            found = clues.take(clues.paths + quoted_paths + (clues.quoted if required else []))
        elif is_query:
            found = clues.take(clues.quoted + clues.phrases)
        else:
            found = clues.take(clues.quoted) if required else None
        if found is not None and (required or is_path or is_query):
            return True, _fit_string(found, schema)
        if not required:
            return False, None
        if isinstance(schema.get("default"), str):
            return True, schema["default"]
        return True, _fit_string("." if is_path else clues.text.strip() or name, schema)
    if not required:
        return False, None
    if kind in ("integer", "number"):
        if clues.numbers:
            return True, _clamp(clues.numbers.pop(0), schema, kind)
        if isinstance(schema.get("default"), (int, float)):
            return True, schema["default"]
        return True, _clamp(0, schema, kind)
    if "default" in schema:
        return True, schema["default"]
    if kind == "boolean":
        return True, False
    if kind == "null":
        return True, None
    if kind == "array":
        count = schema.get("minItems", 0) if isinstance(schema.get("minItems"), int) else 0
        return True, [
            _value(name, schema.get("items", {}), clues, root, required=True)[1] for _ in range(count)
        ]
    if kind == "object":
        return True, _fill_object(schema, clues, root)
    return True, clues.text.strip()


def _rank(name: str, schema: Any, root: dict[str, Any]) -> int:
    """Fill order: search-like strings take quoted text first, then paths take path tokens, then the rest."""
    if _type_of(_resolve(schema, root)) != "string":
        return 2
    lowered = name.lower()
    if any(word in lowered for word in _QUERY_WORDS) or lowered == "q":
        return 0
    return 1 if any(word in lowered for word in _PATH_WORDS) else 2


def _fill_object(schema: dict[str, Any], clues: _Clues, root: dict[str, Any]) -> dict[str, Any]:
    properties = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    order = sorted(properties, key=lambda n: (n not in required, _rank(n, properties[n], root)))
    out: dict[str, Any] = {}
    for name in order:
        filled, value = _value(name, properties[name], clues, root, required=name in required)
        if filled:
            out[name] = value
    for name in sorted(required - out.keys()):  # required but not described: any value is a guess
        out[name] = clues.text.strip()
    return {name: out[name] for name in [*properties, *sorted(required - properties.keys())] if name in out}


def _property_names(schema: Any) -> set[str]:
    """Every property name anywhere in a schema (for ``name=value`` clues)."""
    names: set[str] = set()
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "properties" and isinstance(value, dict):
                names.update(k.lower() for k in value)
            names |= _property_names(value)
    elif isinstance(schema, list):
        for item in schema:
            names |= _property_names(item)
    return names


def arguments_for(function: dict[str, Any], text: str, tool_names: list[str]) -> dict[str, Any]:
    """Arguments valid for ``function["parameters"]``, taken from the user's text where it gives them."""
    schema = function.get("parameters") or {}
    clues = _Clues(text, tool_names, _property_names(schema))
    return _fill_object(_resolve(schema, schema), clues, schema)


def value_for_schema(schema: dict[str, Any], text: str) -> Any:
    """A value valid for ``schema`` built from an answer's text: its strings get the whole text."""
    clues = _Clues(text, [], _property_names(schema))
    clues.quoted = []  # an answer's `code` spans are not the values it means
    return _value("result", schema, clues, schema, required=True)[1]


# --- answers ------------------------------------------------------------------------------------------


def _calls_by_id(messages: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    calls: dict[str, dict[str, Any]] = {}
    for message in messages:
        if message.get("role") == "assistant":
            for call in message.get("tool_calls") or []:
                calls[str(call.get("id"))] = call.get("function") or {}
    return calls


def _looks_failed(text: str) -> bool:
    return bool(_ERROR_START.match(text))


def _summary(after: list[dict[str, Any]]) -> str:
    """Which tools ran since the user's message, with a trimmed excerpt of each result."""
    calls = _calls_by_id(after)
    results = [m for m in after if m.get("role") == "tool"]
    lines = [f"I called {len(results)} tool{'s' if len(results) != 1 else ''}; here is what came back:"]
    for message in results:
        function = calls.get(str(message.get("tool_call_id")), {})
        name = function.get("name") or message.get("name") or "a tool"
        arguments = function.get("arguments") or ""
        shown = f"`{name}`" + (f" with {_short(arguments, 120)}" if arguments not in ("", "{}") else "")
        excerpt = _short(_text(message.get("content")), EXCERPT_LIMIT) or "(no output)"
        lines.append(f"- {shown} {'failed' if _looks_failed(excerpt) else 'returned'}: {excerpt}")
    return "\n".join(lines)


def _reflection(messages: list[dict[str, Any]], last_user: int) -> str:
    """2-4 lessons built from the conversation before the reflection request."""
    history = messages[:last_user]
    users = [_text(m.get("content")) for m in history if m.get("role") == "user"]
    task = _short(users[-1], 100) if users else "the request"  # the latest request: a rewind may change it
    calls = _calls_by_id(history)
    used = Counter(f.get("name") or "?" for f in calls.values())
    failed = [
        (
            calls.get(str(m.get("tool_call_id")), {}).get("name") or m.get("name") or "a tool",
            _text(m.get("content")),
        )
        for m in history
        if m.get("role") == "tool" and _looks_failed(_text(m.get("content")))
    ]
    steps = sum(1 for m in history if m.get("role") == "assistant")
    bullets = []
    if used:
        named = ", ".join(f"`{name}` ({count}×)" for name, count in sorted(used.items()))
        pronoun = "it" if len(used) == 1 else "them"
        bullets.append(
            f'- For a task like "{task}", {named} did the work; reach for {pronoun} first next time.'
        )
    else:
        bullets.append(f'- For a task like "{task}", no tools were needed; a direct answer was enough.')
    if failed:
        name, text = failed[0]
        bullets.append(
            f'- `{name}` failed ("{_short(text, 80)}"); check its arguments before calling it again.'
        )
    elif used:
        bullets.append("- Every tool call succeeded; arguments taken straight from the request worked.")
    plan = "a short plan kept it quick" if steps <= 3 else "batching tool calls could shorten it"
    bullets.append(
        f"- It took {steps} model step{'s' if steps != 1 else ''} and {sum(used.values())} tool call"
        f"{'s' if sum(used.values()) != 1 else ''}; {plan}."
    )
    return "\n".join(bullets)


def _digest(history: list[dict[str, Any]]) -> str:
    """A compact, bounded digest of ``history``: the task, each tool call with its result, the last text."""
    users = [_text(m.get("content")) for m in history if m.get("role") == "user"]
    texts = [_text(m.get("content")) for m in history if m.get("role") == "assistant"]
    latest = next((t for t in reversed(texts) if t.strip()), "")
    calls = _calls_by_id(history)
    lines = []
    for message in history:
        if message.get("role") != "tool":
            continue
        function = calls.get(str(message.get("tool_call_id")), {})
        arguments = function.get("arguments") or ""
        shown = f"`{function.get('name') or message.get('name') or 'a tool'}`"
        if arguments not in ("", "{}"):
            shown += f" {_short(arguments, 80)}"
        excerpt = _short(_text(message.get("content")), _DIGEST_EXCERPT) or "(no output)"
        lines.append(f"- {shown} → {excerpt}")
    head = [
        "Summary of the conversation so far:",
        f'Task: "{_short(users[0], 300)}"' if users else "Task: (none given)",
        f"Tool calls ({len(lines)}):" if lines else "Tool calls: none.",
    ]
    tail = [f'Latest answer: "{_short(latest, 300)}"'] if latest else []
    room = DIGEST_LIMIT - sum(len(line) + 1 for line in head + tail) - 40
    kept: list[str] = []
    for line in reversed(lines):  # the latest calls matter most to what comes next
        if len(line) + 1 > room:
            break
        kept.insert(0, line)
        room -= len(line) + 1
    if len(kept) < len(lines):
        kept.insert(0, f"- … {len(lines) - len(kept)} earlier call(s) left out")
    return "\n".join(head + kept + tail)[:DIGEST_LIMIT]


def _plain_answer(messages: list[dict[str, Any]], user_text: str, functions: list[dict[str, Any]]) -> str:
    system = next((_text(m.get("content")) for m in messages if m.get("role") == "system"), None)
    parts = [f'You asked: "{_short(user_text, 200)}".' if user_text.strip() else "Your message was empty."]
    parts.append("I am the offline demo model: I follow fixed rules and cannot really think about it.")
    if functions:
        names = ", ".join(f"`{f['name']}`" for f in functions[:10]) + (", …" if len(functions) > 10 else "")
        parts.append(
            f"Name one of my tools ({names}) in your message and I will call it and summarise the result."
        )
    if system:
        parts.append(f"(I was given a system prompt of {len(system)} characters.)")
    return " ".join(parts)


def _after_group(text: str) -> str | None:
    """``text`` after its leading balanced ``( … )`` group and a space (a lesson's date and heading)."""
    depth = 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return text[index + 1 :].strip() if text[index + 1 : index + 2] == " " else None
    return None


def _curation_plan(listing: str) -> str:
    """A consolidation plan that merges lessons saying the same words (case, spacing and end punctuation
    aside) and keeps every other lesson as it is: the offline model drops nothing."""
    groups: dict[str, tuple[str, list[str]]] = {}
    for line in listing.splitlines():
        match = _LISTED_LESSON.match(line.strip())
        text = _after_group(match["rest"]) if match else None
        if match is None or not text:
            continue
        key = " ".join(text.casefold().split()).rstrip(".!;: ")
        groups.setdefault(key, (text, []))[1].append(match["id"])
    keep = [{"text": text, "from": ids} for text, ids in groups.values()]
    return json.dumps({"keep": keep, "drop": []}, ensure_ascii=False)


def _estimate_tokens(value: Any) -> int:
    text = (
        value
        if isinstance(value, str)
        else json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    )
    return (len(text) + 3) // 4


class OfflineModel:
    """A deterministic demo/test model: no network, no randomness, no intelligence.

    Given the last user message it (a) calls each offered tool the text names, with schema-valid
    arguments taken from the text (never with ``tool_choice="none"``), ids numbered on from the calls
    already in the conversation; (b) once tool results follow, summarises them; (c) answers a
    compaction request ("summarise the conversation so far") with a bounded digest, a reflection
    request ("reflect", "lesson") with lesson bullets built from the conversation, and a curation request
    (consolidation) with a plan merging lessons that say the same words; (d) otherwise replies
    quoting the request. With a ``response_schema`` its text answers are JSON valid for the schema.
    ``delay`` sleeps before answering, to demo stopping a run.
    """

    name = "offline"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay

    async def complete(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        *,
        temperature: float = 0.0,
        on_text: TextSink | None = None,
        tool_choice: ToolChoice = "auto",
        response_schema: dict[str, Any] | None = None,
    ) -> ModelResponse:
        """Answer by the rules above; cancellable at every await (``temperature`` is ignored)."""
        await anyio.sleep(self.delay)
        response = self.respond(messages, tools, tool_choice=tool_choice, response_schema=response_schema)
        if response.content and on_text is not None:
            size = max(1, -(-len(response.content) // 4))
            for start in range(0, len(response.content), size):
                on_text(response.content[start : start + size])
                await anyio.lowlevel.checkpoint()  # a cancellation point between chunks
        return response

    def respond(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        *,
        tool_choice: ToolChoice = "auto",
        response_schema: dict[str, Any] | None = None,
    ) -> ModelResponse:
        """The answer, synchronously: a pure function of its arguments."""
        functions = _tool_functions(tools)
        last_user = next(
            (i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "user"), None
        )
        calls: list[ToolCall] = []
        content: str | None
        if last_user is None:
            content = "There is no user message to answer yet."
        else:
            user_text = _text(messages[last_user].get("content"))
            after = messages[last_user + 1 :]
            if any(m.get("role") == "tool" for m in after):
                content = _summary(after)
            elif (
                _CURATION_REQUEST.search(_text(messages[0].get("content")))
                and messages[0].get("role") == "system"
            ):
                content = _curation_plan(user_text)
            elif _COMPACTION_REQUEST.search(user_text):
                content = _digest(messages[:last_user])
            elif re.search(r"reflect|lesson", user_text, re.IGNORECASE):
                content = _reflection(messages, last_user)
            else:
                named = _named_tools(user_text, functions) if tool_choice != "none" else []
                names = [f["name"] for f in functions]
                made = sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")
                calls = [
                    ToolCall(
                        id=f"call_offline_{made + index}",
                        function=FunctionCall(
                            name=function["name"],
                            arguments=json.dumps(arguments_for(function, segment, names), ensure_ascii=False),
                        ),
                    )
                    for index, ((_, function), segment) in enumerate(
                        zip(named, _segments(user_text, named), strict=False), start=1
                    )
                ]
                content = None if calls else _plain_answer(messages, user_text, functions)
        if content is not None and response_schema is not None:
            content = json.dumps(value_for_schema(response_schema, content), ensure_ascii=False)
        completion = (content or "") + "".join(c.function.name + c.function.arguments for c in calls)
        usage = MessageUsage(
            prompt_tokens=_estimate_tokens(messages) + (_estimate_tokens(tools) if tools else 0),
            completion_tokens=_estimate_tokens(completion),
        )
        return ModelResponse(content=content, tool_calls=calls, usage=usage)
