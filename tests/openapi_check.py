"""Checking a real answer against the server's own OpenAPI document: the operation, the status it declares,
the
content type, the JSON body by its schema (JSON Schema 2020-12) and the required headers.

No test here: `conftest.openapi_conformance` runs it on every answer the HTTP tests receive.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

DOC_URI = "urn:cnn-serve:openapi"
JSON = dict[str, Any]


def _pointer(*parts: str) -> str:
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def _resolve(doc: JSON, node: JSON, pointer: str) -> tuple[JSON, str]:
    """A `$ref` followed (within the document), with the JSON pointer of where it led."""
    while "$ref" in node:
        pointer = node["$ref"].removeprefix("#")
        node = doc
        for part in pointer.strip("/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node, pointer


@cache
def _template(path: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(path)))


def find_operation(doc: JSON, method: str, path: str) -> tuple[str, JSON] | None:
    """The document's path template and operation for a request, or None."""
    for template, item in doc["paths"].items():
        if _template(template).fullmatch(path) and method.lower() in item:
            return template, item[method.lower()]
    return None


def _media_matches(declared: str, received: str) -> bool:
    kind, _, sub = declared.partition("/")
    got_kind, _, got_sub = received.partition("/")
    return kind == got_kind and sub in ("*", got_sub)


def _validate(doc: JSON, pointer: str, value: Any) -> list[str]:
    registry = Registry().with_resource(DOC_URI, Resource(contents=doc, specification=DRAFT202012))
    validator = jsonschema.Draft202012Validator({"$ref": f"{DOC_URI}#{pointer}"}, registry=registry)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or 'body'}: {e.message[:300]}"
        for e in validator.iter_errors(value)
    ]


def check(doc: JSON, method: str, path: str, status: int, headers: dict[str, str], body: bytes) -> list[str]:
    """What is wrong with this answer by the document (nothing: an empty list)."""
    headers = {k.lower(): v for k, v in headers.items()}
    media = headers.get("content-type", "").split(";")[0].strip().lower()
    found = find_operation(doc, method, path)
    if found is None:
        # No such operation (a path without a route, a method the path does not take): the one error body.
        if media != "application/json":
            return [f"{method} {path} (no operation) answered {status} {media!r}, not the JSON error body"]
        return _validate(doc, "/components/schemas/Error", json.loads(body))
    template, operation = found
    where = f"{method} {template} -> {status}"
    declared = operation["responses"].get(str(status)) or operation["responses"].get("default")
    if declared is None:
        return [f"{where}: status not declared (declared: {sorted(operation['responses'])})"]
    response, pointer = _resolve(
        doc, declared, _pointer("paths", template, method.lower(), "responses", str(status))
    )
    problems = []
    for name, spec in response.get("headers", {}).items():
        spec, _ = _resolve(doc, spec, "")
        if spec.get("required") and name.lower() not in headers:
            problems.append(f"{where}: header {name} missing")
        elif name.lower() in headers and spec.get("schema", {}).get("type") == "string":
            problems += [
                f"{where}: header {name}: {p}"
                for p in _validate_inline(spec["schema"], headers[name.lower()])
            ]
    content = response.get("content", {})
    matching = [m for m in content if _media_matches(m, media)]
    if content and not matching:
        return problems + [f"{where}: content type {media!r} not declared ({sorted(content)})"]
    if media == "application/json" and matching:
        schema_pointer = pointer + _pointer("content", matching[0], "schema")
        try:
            value = json.loads(body)
        except ValueError:
            return problems + [f"{where}: body is not JSON"]
        problems += [f"{where}: {p}" for p in _validate(doc, schema_pointer, value)]
    return problems


def _validate_inline(schema: JSON, value: Any) -> list[str]:
    return [e.message[:300] for e in jsonschema.Draft202012Validator(schema).iter_errors(value)]
