"""Derive the facts the Adyen fake is checked against from Adyen's published OpenAPI file.

    python scripts/adyen_schema_subset.py CheckoutService-v71.json > tests/data/adyen_checkout_v71.json
    python scripts/adyen_schema_subset.py --check CheckoutService-v71.json

The input is ``json/CheckoutService-v71.json`` of github.com/Adyen/adyen-openapi. The output
keeps, for the five operations the relay uses, only names and rules: the HTTP status codes
each may answer, each request's required and known fields, each reply's required fields
and the JSON type and enumeration of every property the fake sends, and the error object's
fields. tests/test_adyen_fake.py validates the fake's replies and the adapter's requests
against it. `--check CheckoutService-v71.json` re-derives it and exits 1 on a difference
(run it when Adyen publishes a new spec; the spec itself is not stored here).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OPERATIONS = {
    "payments": "/payments",
    "captures": "/payments/{paymentPspReference}/captures",
    "cancels": "/payments/{paymentPspReference}/cancels",
    "refunds": "/payments/{paymentPspReference}/refunds",
    "reversals": "/payments/{paymentPspReference}/reversals",
}


def _resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    if "allOf" in node and "properties" not in node:
        merged: dict[str, Any] = {"properties": {}, "required": []}
        for part in node["allOf"]:
            part = _resolve(spec, part)
            merged["properties"].update(part.get("properties", {}))
            merged["required"] += part.get("required", [])
        return merged
    return node


def _shape(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    schema = _resolve(spec, schema)
    properties: dict[str, Any] = {}
    for name, prop in schema.get("properties", {}).items():
        prop = _resolve(spec, prop) if "$ref" in prop else prop
        entry: dict[str, Any] = {"type": prop.get("type", "object")}
        if "enum" in prop:
            entry["enum"] = prop["enum"]
        if entry["type"] == "object" and "properties" in prop:
            entry["required"] = sorted(prop.get("required", []))
            entry["properties"] = {
                k: {"type": v.get("type", "object")} for k, v in prop["properties"].items()
            }
        properties[name] = entry
    return {"required": sorted(schema.get("required", [])), "properties": properties}


def subset(spec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"version": spec["info"]["version"], "operations": {}}
    for name, path in OPERATIONS.items():
        op = spec["paths"][path]["post"]
        request = op["requestBody"]["content"]["application/json"]["schema"]
        success = "200" if name == "payments" else "201"
        reply = op["responses"][success]["content"]["application/json"]["schema"]
        shape = _shape(spec, request)
        out["operations"][name] = {
            "path": path,
            "statuses": sorted(op["responses"]),
            "success": int(success),
            "request": {"required": shape["required"], "fields": sorted(shape["properties"])},
            "reply": _shape(spec, reply),
        }
    out["error"] = _shape(spec, {"$ref": "#/components/schemas/ServiceError"})
    return out


STORED = Path(__file__).resolve().parent.parent / "tests" / "data" / "adyen_checkout_v71.json"

if __name__ == "__main__":
    # `adyen_schema_subset.py SPEC` prints the subset; `--check SPEC` compares it with the
    # stored tests/data file (exit 1 on a difference), for when Adyen publishes a new spec.
    check = sys.argv[1] == "--check"
    with open(sys.argv[-1], encoding="utf-8") as f:
        derived = subset(json.load(f))
    if check:
        same = derived == json.loads(STORED.read_text(encoding="utf-8"))
        print("the stored subset matches the spec" if same else "the stored subset differs")
        sys.exit(0 if same else 1)
    json.dump(derived, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
