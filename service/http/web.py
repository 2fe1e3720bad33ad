"""The pages for people: the classifier page at `/` and Swagger UI at `/docs`, served from the package.

Nothing is fetched from elsewhere: the page's HTML, CSS and JavaScript lie in `static/` beside this module,
and Swagger UI's files come from the `swagger-ui-py` package (its `static/` folder, Swagger UI 5, which reads
OpenAPI 3.1). Every page answer carries a Content-Security-Policy that lets the browser load and send nothing
but to this server, so a picture dropped on the page can go nowhere else. The files hold no data: they are
open like the probes (a browser's navigation sends no bearer token), and what they fetch (`/models`,
`/classify`, `/openapi.json`) asks for the token as every API call does.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

from service.errors import FileNotFound

from .routes import Runtime, endpoint

STATIC = Path(__file__).with_name("static")
PAGE, DOCS_PAGE = "index.html", "docs.html"
# Swagger UI's files that /docs loads: the rest of the package (its editor, source maps) is not served.
SWAGGER_FILES = ("swagger-ui.css", "swagger-ui-bundle.js")
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# The browser may load scripts, styles and images from this server only, and connect nowhere else; the
# chosen picture is shown from a blob: URL, which never leaves the browser.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def page_files() -> tuple[str, ...]:
    """The files `/static/{file}` serves: every file of `static/` but the two pages themselves."""
    return tuple(sorted(p.name for p in STATIC.iterdir() if p.is_file() and p.name not in (PAGE, DOCS_PAGE)))


@functools.cache
def swagger_folder() -> Path | None:
    """Swagger UI's files in the installed `swagger-ui-py` (found without importing it), or None."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if all((folder / name).is_file() for name in SWAGGER_FILES) else None


@functools.cache
def _read(path: Path) -> bytes:
    return path.read_bytes()


def _file(path: Path) -> Response:
    return Response(_read(path), media_type=MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)


@endpoint("page")
async def page(request: Request, runtime: Runtime) -> Response:
    return _file(STATIC / PAGE)


@endpoint("page_asset")
async def page_asset(request: Request, runtime: Runtime) -> Response:
    name = request.path_params["file"]
    if name not in page_files():
        raise FileNotFound(f"no file {name!r}; the page has {', '.join(page_files())}")
    return _file(STATIC / name)


@endpoint("docs")
async def docs(request: Request, runtime: Runtime) -> Response:
    return _file(STATIC / DOCS_PAGE)


@endpoint("docs_asset")
async def docs_asset(request: Request, runtime: Runtime) -> Response:
    name = request.path_params["file"]
    folder = swagger_folder()
    if name not in SWAGGER_FILES:
        raise FileNotFound(f"no file {name!r}; Swagger UI's are {', '.join(SWAGGER_FILES)}")
    if folder is None:
        raise FileNotFound("Swagger UI is not installed here: install the swagger-ui-py package")
    return _file(folder / name)
