"""The API's own description at /openapi.json: valid OpenAPI 3.1, one operation per route of the real BentoML
app and no other, limits and error codes from the code in force; and the pages' auth, request-id and switch
rules on real servers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openapi_spec_validator import validate

from service import augmentation
from service.config import Settings
from service.errors import ServiceError
from service.http import api, schemas, web
from tests.conftest import WEB_TOKEN
from tests.http_server import ROOT, Server, running_server

pytestmark = pytest.mark.usefixtures("openapi_conformance")

MODELS = ["efficientnet_lite0", "lenet5"]
VARIANTS = {
    "default": Settings(),
    "token": Settings(auth_token="t"),
    "api-only": Settings(web_ui=False, auth_token="t"),
    "tight": Settings(max_top_k=7, max_images_per_request=3, max_request_bytes=12345, request_timeout_s=2.5),
}


def node_path(ref: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in ref.removeprefix("#/").split("/")]


def follow(doc: dict, node: dict) -> dict:
    """A `$ref` of the document followed to what it names."""
    while "$ref" in node:
        target = doc
        for part in node_path(node["$ref"]):
            target = target[part]
        node = target
    return node


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_document_is_valid_openapi_3_1(variant: str) -> None:
    doc = api.document(VARIANTS[variant], MODELS)
    assert doc["openapi"] == "3.1.0"
    validate(doc)  # openapi-spec-validator picks the 3.1 schema from the version field
    json.dumps(doc)  # and it is plain JSON


ROUTES_SCRIPT = """
import json
from service.http.api import FALLBACK
from service.http.service import ClassifierService

app = ClassifierService.to_asgi(is_main=True)
routes = {"served": [], "shadowed": []}
part = "served"
for route in app.routes:
    if type(route).__name__ == "PassiveMount":  # our app, mounted at /: its routes, then its catch-all
        ours = [r for r in route.app.routes if r.path != FALLBACK]
        routes["served"] += [[r.path, sorted(r.methods - {"HEAD"})] for r in ours]
        part = "shadowed"
        continue
    routes[part].append([route.path, sorted((getattr(route, "methods", None) or {"ANY"}) - {"HEAD"})])
print(json.dumps(routes))
"""


def bento_routes(tmp_path: Path, web_ui: bool) -> subprocess.Popen:
    """The routes of the real BentoML app (what `bentoml serve` runs), listed by a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNN_SERVE_")}
    env.update(
        {"CNN_SERVE_WEB_UI": "1" if web_ui else "0", "BENTOML_HOME": str(tmp_path / f"bento-{web_ui}")}
    )
    env["BENTOML_DO_NOT_TRACK"] = "True"
    return subprocess.Popen(
        [sys.executable, "-c", ROUTES_SCRIPT],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_every_route_has_a_description_and_every_description_a_route(tmp_path: Path) -> None:
    """The BentoML app's routes (ours mounted at `/`, and BentoML's own before them) are exactly the
    document's operations, with the pages and without them. BentoML's routes after our mount are shadowed by
    our JSON 404 (its index page and docs.json: `test_bentoml_pages_are_shadowed`)."""
    listings = {web_ui: bento_routes(tmp_path, web_ui) for web_ui in (True, False)}
    for web_ui, proc in listings.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-3000:]
        routes = json.loads(out.decode().strip().splitlines()[-1])
        served = {(path, method) for path, methods in routes["served"] for method in methods}
        doc = api.document(Settings(web_ui=web_ui), MODELS)
        described = {(path, method.upper()) for path, item in doc["paths"].items() for method in item}
        assert served - described == set(), f"routes without a description (web_ui={web_ui})"
        assert described - served == set(), f"descriptions without a route (web_ui={web_ui})"
        assert ("/", "GET") in served if web_ui else ("/", "GET") not in served
        assert {path for path, _ in routes["shadowed"]} <= {"/", "/docs.json", "/static_content"}


def test_path_parameters_are_declared_and_operation_ids_unique() -> None:
    doc = api.document(Settings(), MODELS)
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    for path, item in doc["paths"].items():
        for op in item.values():
            declared = {
                follow(doc, p)["name"] for p in op.get("parameters", []) if follow(doc, p)["in"] == "path"
            }
            assert declared == set(re.findall(r"\{(\w+)\}", path)), path
            assert op["summary"] and op["tags"] and "500" in op["responses"]


def test_limits_and_choices_are_those_in_force() -> None:
    settings = VARIANTS["tight"]
    doc = api.document(settings, MODELS)
    parameters = doc["components"]["parameters"]
    assert parameters["top_k"]["schema"]["maximum"] == 7 and parameters["top_k"]["schema"]["minimum"] == 1
    assert parameters["tta"]["schema"]["enum"] == list(augmentation.MODES)
    assert parameters["model"]["schema"]["enum"] == MODELS and parameters["name"]["schema"]["enum"] == MODELS
    bodies = doc["components"]["requestBodies"]
    batch = bodies["ClassifyBatchBody"]["content"]
    assert batch["multipart/form-data"]["schema"]["properties"]["files"]["maxItems"] == 3
    assert batch["application/json"]["schema"]["properties"]["images"]["maxItems"] == 3
    image = bodies["ClassifyBody"]["content"]["application/json"]["schema"]["properties"]["image"]
    assert image["maxLength"] == 12345 and "12345 bytes" in bodies["ClassifyBody"]["description"]
    assert doc["info"]["x-limits"]["max_request_bytes"] == 12345
    assert doc["info"]["x-limits"]["request_timeout_s"] == 2.5
    assert "(2.5 s)" in parameters["request_timeout"]["description"]
    # Without models (a server still starting) the model is any string.
    assert "enum" not in api.document(Settings())["components"]["parameters"]["model"]["schema"]


def typed_errors() -> list[type[ServiceError]]:
    found, todo = [], [ServiceError]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        found += [cls] if cls is not ServiceError else []
    return found


def test_every_typed_error_is_described_with_its_status() -> None:
    doc = api.document(Settings(auth_token="t"), MODELS)
    responses = doc["components"]["responses"]
    assert len(typed_errors()) >= 12
    for cls in typed_errors():
        response = responses[schemas.error_response_name(cls.http_status)]
        codes = response["content"]["application/json"]["schema"]["allOf"][1]["properties"]["code"]["enum"]
        assert cls.code in codes, (cls, codes)
        assert cls.code in doc["components"]["schemas"]["Error"]["properties"]["code"]["enum"]
    classify = doc["paths"]["/classify"]["post"]["responses"]
    assert set(classify) == {"200", "400", "401", "404", "408", "413", "415", "499", "500", "503", "504"}


def test_security_and_the_middleware_agree_on_the_open_routes() -> None:
    """With a token, the operations that need it (the document's default security, and 401 among their
    answers) are exactly those whose paths the middleware refuses without it; without a token no operation
    asks for the bearer token."""
    plain = api.document(Settings(), MODELS)
    assert "security" not in plain and "bearer" not in plain["components"].get("securitySchemes", {})
    settings = Settings(auth_token="t")
    doc = api.document(settings, MODELS)
    assert doc["security"] == [{"bearer": []}]
    scheme = doc["components"]["securitySchemes"]["bearer"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    is_open = api.open_rule(settings)
    for path, item in doc["paths"].items():
        for op in item.values():
            concrete = re.sub(r"\{\w+\}", "x", path)
            needs_token = "security" not in op  # the document's default: the bearer token
            assert is_open(concrete) is not needs_token, path
            if needs_token:
                assert "401" in op["responses"], path
    assert not is_open("/v2/models/x/ready/more") and not is_open("/static/a/b") and not is_open("/models")
    assert not api.open_rule(Settings(web_ui=False, auth_token="t"))("/")


def test_swagger_ui_comes_from_the_package_and_reads_openapi_3_1() -> None:
    """Swagger UI 5 (OpenAPI 3.1 came with 5.0): its files are in the installed package, not on a CDN."""
    folder = web.swagger_folder()
    assert folder is not None, "swagger-ui-py is not installed: pip install -e '.[serve]'"
    bundle = (folder / "swagger-ui-bundle.js").read_text(errors="replace")
    assert "isOAS31" in bundle
    for name in web.page_files() + (web.PAGE, web.DOCS_PAGE):
        text = (web.STATIC / name).read_text()
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", text), f"{name} loads from elsewhere"
        assert "localStorage" not in text and "sessionStorage" not in text and "document.cookie" not in text


def test_the_conformance_check_finds_what_differs() -> None:
    """The check every HTTP test's answers go through (`conftest.openapi_conformance`) has teeth."""
    from tests import openapi_check

    doc = api.document(Settings(), MODELS)
    rid = {"x-request-id": "r1", "content-type": "application/json"}
    good = {"model": "lenet5", "version": "1", "request_id": "r1", "predictions": []}
    good["predictions"] = [{"index": 3, "id": "3", "label": "3", "probability": 0.9}]
    assert openapi_check.check(doc, "POST", "/classify", 200, rid, json.dumps(good).encode()) == []
    for status, headers, body, expected in (
        (418, rid, good, "status not declared"),
        (200, {"content-type": "application/json"}, good, "header x-request-id missing"),
        (200, {**rid, "content-type": "text/html"}, good, "content type 'text/html' not declared"),
        (200, rid, {**good, "extra": 1}, "Additional properties"),
        (200, rid, {**good, "predictions": [{**good["predictions"][0], "probability": 2}]}, "maximum"),
        (400, rid, {"code": "teapot", "message": "m", "request_id": "r1", "error": "m"}, "is not one of"),
    ):
        problems = openapi_check.check(doc, "POST", "/classify", status, headers, json.dumps(body).encode())
        assert any(expected in p for p in problems), (expected, problems)
    # No such operation: the answer must still be the one error body.
    assert openapi_check.check(doc, "GET", "/nope", 404, {"content-type": "text/plain"}, b"Not Found")


# ------------------------------------------------------------------------------------------- live servers


def test_the_document_needs_the_token_and_says_so(token_server: Server) -> None:
    with httpx.Client(base_url=token_server.url, timeout=30) as c:
        refused = c.get("/openapi.json", headers={"x-request-id": "doc-no-token"})
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
        assert refused.json()["request_id"] == "doc-no-token" == refused.headers["x-request-id"]
        doc = c.get("/openapi.json", headers={"Authorization": f"Bearer {WEB_TOKEN}"}).json()
    validate(doc)
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["components"]["parameters"]["model"]["schema"]["enum"] == ["lenet5"]
    assert doc["info"]["x-limits"]["max_request_bytes"] == 1048576


def test_the_pages_files_are_open_and_follow_the_request_id_rule(token_server: Server) -> None:
    """A browser's navigation sends no token: the pages' files (no data in them) are open; what they fetch is
    not. Every answer has the request id, and the pages a policy that keeps the browser on this server."""
    with httpx.Client(base_url=token_server.url, timeout=30) as c:
        for path, media in (
            ("/", "text/html"),
            ("/static/app.js", "text/javascript"),
            ("/static/style.css", "text/css"),
            ("/docs", "text/html"),
            ("/docs/swagger-ui-bundle.js", "text/javascript"),
            ("/docs/swagger-ui.css", "text/css"),
        ):
            r = c.get(path, headers={"x-request-id": f"page-{len(path)}"})
            assert r.status_code == 200 and r.headers["content-type"].startswith(media), (path, r.text[:200])
            assert r.headers["x-request-id"] == f"page-{len(path)}"
            assert "connect-src 'self'" in r.headers["content-security-policy"]
            assert r.headers["x-content-type-options"] == "nosniff"
        for path in ("/static/nope.js", "/docs/swagger-editor-bundle.js", "/docs/swagger-ui-bundle.js.map"):
            r = c.get(path)
            assert r.status_code == 404 and r.json()["code"] == "not_found", path
        for path in ("/models", "/openapi.json", "/classify"):
            assert c.request("GET" if path != "/classify" else "POST", path).status_code == 401, path
        assert c.post("/", headers={"Authorization": f"Bearer {WEB_TOKEN}"}).status_code == 405


def test_bentoml_pages_are_shadowed(token_server: Server) -> None:
    """BentoML's own index and docs.json lie behind our routes: a JSON 404 like any path without a route."""
    auth = {"Authorization": f"Bearer {WEB_TOKEN}"}
    with httpx.Client(base_url=token_server.url, timeout=30, headers=auth) as c:
        for path in ("/docs.json", "/static_content/index.css", "/no/such/route"):
            r = c.get(path)
            assert r.status_code == 404 and r.json()["code"] == "not_found", (path, r.text[:200])


def test_a_line_break_in_a_path_gets_the_json_404(token_server: Server) -> None:
    """Found by fuzzing: BentoML's mount does not match a path with a line break, whose 404 was plain text."""
    auth = {"Authorization": f"Bearer {WEB_TOKEN}"}
    for path in ("/v2/models/a%0Ab/ready", "/v2/models/a%0Ab", "/x%0Ay", "/static/a%0Ab"):
        r = httpx.get(token_server.url + path, headers=auth, timeout=30)
        assert r.status_code == 404 and r.json()["code"] == "not_found", (path, r.text)


@pytest.fixture(scope="module")
def api_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("api-only")
    with running_server(tmp, "--models", "lenet5", "--default-model", "lenet5", "--no-web-ui") as s:
        yield s


def test_the_pages_can_be_turned_off(api_only: Server) -> None:
    with httpx.Client(base_url=api_only.url, timeout=30) as c:
        for path in ("/", "/docs", "/static/app.js", "/docs/swagger-ui.css"):
            r = c.get(path)
            assert r.status_code == 404 and r.json()["code"] == "not_found", path
        doc = c.get("/openapi.json").json()
        assert "/" not in doc["paths"] and "/docs" not in doc["paths"] and "/openapi.json" in doc["paths"]
        assert c.post("/classify", params={"model": "lenet5"}, content=b"not an image").status_code == 400


def test_the_readme_shows_the_page_in_a_small_screenshot() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "http://localhost:3000/docs" in readme and "](docs/web-page.png)" in readme
    shot = ROOT / "docs" / "web-page.png"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size < 200 * 1024
