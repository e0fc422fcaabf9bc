"""Every route the server answers is described in /openapi.json, and nothing else is: adding an endpoint means a
route in app.py and its entry in openapi.py, and this test names whichever is missing."""

from __future__ import annotations

from scalellm_jax.server.app import OPENAPI, create_app
from scalellm_jax.server.config import ServerConfig


def test_every_route_is_documented_and_every_documented_path_is_served():
    app = create_app(ServerConfig(model_name="m"))
    served = {route.resource.canonical for route in app.router.routes()} - {"/openapi.json"}
    documented = set(app[OPENAPI]["paths"])
    assert served - documented == set(), "routes missing from openapi.py"
    assert documented - served == set(), "openapi.py documents paths the server does not serve"
