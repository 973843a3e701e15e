"""/docs: Swagger UI over /openapi.json, its script, styles and icon served by the server itself
from the installed swagger-ui-bundle-v2 package, so that the page works where no CDN can be reached
(most GPU clusters). /redoc is off: it would load its script from a CDN."""
from fastapi import HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from swagger_ui_bundle import swagger_ui_path

SCRIPT, STYLES, ICON = "swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"  # what the page asks for


async def page(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")  # behind a proxy that serves us under a path
    return get_swagger_ui_html(openapi_url=root + request.app.openapi_url, title=f"{request.app.title} API",
                               swagger_js_url=f"{root}/docs/{SCRIPT}", swagger_css_url=f"{root}/docs/{STYLES}",
                               swagger_favicon_url=f"{root}/docs/{ICON}",
                               swagger_ui_parameters={"validatorUrl": None})  # no call to swagger.io's validator


async def asset(asset: str) -> FileResponse:
    if asset not in (SCRIPT, STYLES, ICON):
        raise HTTPException(404, f"no {asset} here")
    return FileResponse(str(swagger_ui_path / asset))
