"""Check Kubernetes objects against KServe's own API models, strictly: run by the `kserve` package's
virtualenv (build/kserve, `make kserve`; its pins conflict with the dev extra's), not by pytest.

Reads a JSON list of objects on stdin; prints a JSON list with, per object, the problems found (empty: the
object is valid). Every key must be a field of the model it sits in (the package's `attribute_map`, i.e. the
CRD's names), every value of the field's type, recursively down to the Kubernetes core types the KServe
models use; the model is then built with its required fields checked (the package's client-side validation).
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import kubernetes.client.models as core
from kserve import models as kserve_models

KINDS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}
LIST = re.compile(r"^(?:list|List)\[(.+)\]$")
DICT = re.compile(r"^(?:dict\(|Dict\[)str, (.+)[)\]]$")
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float)}


def model_class(name: str) -> Any:
    cls = getattr(kserve_models, name, None) or getattr(core, name, None)
    if cls is None:
        raise LookupError(f"no model {name} in kserve or kubernetes")
    return cls


def check(value: Any, type_name: str, path: str, problems: list[str]) -> Any:
    """`value` as `type_name` (a model name, list[...], dict(str, ...), a primitive or object); problems
    appended with their path; returns the built value."""
    if m := LIST.match(type_name):
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {type(value).__name__}")
            return None
        return [check(v, m.group(1), f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if m := DICT.match(type_name):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a map, got {type(value).__name__}")
            return None
        return {k: check(v, m.group(1), f"{path}.{k}", problems) for k, v in value.items()}
    if type_name == "object":
        return value
    if type_name in PRIMITIVES:
        ok = isinstance(value, PRIMITIVES[type_name]) and not (
            type_name != "bool" and isinstance(value, bool)
        )
        if not ok:
            problems.append(f"{path}: expected {type_name}, got {type(value).__name__} {value!r}")
        return value
    if type_name == "datetime":
        return value
    cls = model_class(type_name)
    if not isinstance(value, dict):
        problems.append(f"{path}: expected an object ({type_name}), got {type(value).__name__}")
        return None
    by_json = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    before = len(problems)
    kwargs = {}
    for key, v in value.items():
        attr = by_json.get(key)
        if attr is None:
            problems.append(f"{path}.{key}: unknown field of {type_name}")
            continue
        kwargs[attr] = check(v, cls.openapi_types[attr], f"{path}.{key}", problems)
    if len(problems) > before:  # a part is wrong already: the whole would only repeat it
        return None
    try:  # the package's own validation: required fields, enums (pydantic or client-side checks)
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        problems.append(f"{path}: {' '.join(str(e).split())[:300]}")
    return None


def check_object(doc: dict[str, Any]) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in KINDS:
        return [f"{key[0]}/{key[1]} is not a KServe kind this check knows"]
    problems: list[str] = []
    check(doc, KINDS[key], doc["kind"], problems)
    return problems


def main() -> int:
    docs = json.load(sys.stdin)
    json.dump([check_object(d) for d in docs], sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
