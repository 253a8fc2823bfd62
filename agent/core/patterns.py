"""JSON Schema validation whose regular expressions cannot hang the server.

A caller's ``output_schema`` may hold a pattern that backtracks exponentially (``(a+)+$``) on the model's
answer. Python's ``re`` can neither time out nor let go of the GIL while it matches, so one such match
would freeze every run and every host of the shared server. Here the keywords that match patterns
(``pattern``, ``patternProperties`` and ``additionalProperties``, which looks at the latter) use the
``regex`` library instead, under one time budget per validation, releasing the GIL: the validation runs
in a worker thread and gives up with :class:`PatternTimeout` once the budget is spent. (``regex`` accepts
every pattern ``re`` does, which is what ``check_schema`` holds a schema's patterns to; it reads a few rare
constructs differently, POSIX classes such as ``[[:alpha:]]`` among them.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import regex
from jsonschema import Draft202012Validator, ValidationError
from jsonschema.protocols import Validator
from jsonschema.validators import extend

MATCH_BUDGET_SECONDS = 2.0
"""All pattern matching of one validation together; ordinary patterns take microseconds."""


class PatternTimeout(Exception):
    """A pattern of the schema took longer to match than the budget allows."""

    def __init__(self, pattern: str):
        shown = pattern if len(pattern) <= 80 else pattern[:80] + "…"
        super().__init__(shown)
        self.pattern = shown


def bounded_validator(schema: dict[str, Any], budget: float = MATCH_BUDGET_SECONDS) -> Validator:
    """A 2020-12 validator for ``schema`` whose pattern matches stop, together, after ``budget`` seconds
    (only the time spent matching counts: the rest of the validation is not the patterns' doing)."""
    spent = 0.0

    def search(pattern: str, text: str) -> bool:
        nonlocal spent
        left = budget - spent
        if left <= 0:
            raise PatternTimeout(pattern)
        began = time.monotonic()
        try:
            return regex.search(pattern, text, timeout=left, concurrent=True) is not None
        except TimeoutError:
            raise PatternTimeout(pattern) from None
        finally:
            spent += time.monotonic() - began

    def pattern(validator: Any, patrn: str, instance: Any, _: Any) -> Iterator[ValidationError]:
        if validator.is_type(instance, "string") and not search(patrn, instance):
            shown = instance if len(instance) <= 80 else instance[:80] + "…"
            yield ValidationError(f"{shown!r} does not match {patrn!r}")

    def pattern_properties(
        validator: Any, patterns: dict[str, Any], instance: Any, _: Any
    ) -> Iterator[ValidationError]:
        if not validator.is_type(instance, "object"):
            return
        for patrn, subschema in patterns.items():
            for key, value in instance.items():
                if search(patrn, key):
                    yield from validator.descend(value, subschema, path=key, schema_path=patrn)

    def additional_properties(
        validator: Any, allowed: Any, instance: Any, schema: dict[str, Any]
    ) -> Iterator[ValidationError]:
        if not validator.is_type(instance, "object"):
            return
        named = schema.get("properties", {})
        patterns = list(schema.get("patternProperties", {}))
        extras = [
            key for key in instance if key not in named and not any(search(patrn, key) for patrn in patterns)
        ]
        if validator.is_type(allowed, "object"):
            for extra in extras:
                yield from validator.descend(instance[extra], allowed, path=extra)
        elif allowed is False and extras:
            listed = ", ".join(repr(extra) for extra in sorted(extras)[:10])
            yield ValidationError(f"Additional properties are not allowed ({listed} unexpected)")

    checked = extend(
        Draft202012Validator,
        {
            "pattern": pattern,
            "patternProperties": pattern_properties,
            "additionalProperties": additional_properties,
        },
    )
    return checked(schema)
