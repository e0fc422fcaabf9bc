"""The playground's server side: the page and its files at ``/`` (no key needed, nothing from other sites), the
``/state`` document its live panel polls, and the HTTP responses counter the dashboard's error rates read.
The page itself runs in a real browser in ``test_playground_browser.py``."""

from __future__ import annotations

import asyncio
import pathlib
import re
import tomllib

import aiohttp
from server_helpers import ROOT, call, kv_pages_in_use, metric, wait_until

from scalellm_jax.server import playground
from scalellm_jax.server.live_state import ServerStateView

COMPLETION = {"model": "tiny-test", "prompt": "Hello", "max_tokens": 4}


def test_the_page_and_its_files_are_served_with_a_policy_that_allows_only_this_server(server):
    status, headers, page = call(server.url + "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
    # every file the page names is one the server serves, and none comes from elsewhere
    linked = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert {"/playground/playground.js", "/playground/playground.css"} <= set(linked)
    assert not [url for url in linked if "//" in url], linked
    for name, kind in playground.ASSETS.items():
        status, headers, body = call(f"{server.url}/playground/{name}")
        assert status == 200 and headers["Content-Type"].startswith(kind) and len(body) > 100


def test_unknown_playground_files_are_a_404_naming_the_files(server):
    for name in ("app.py", "..%2Fapp.py", "index.html"):
        status, _, body = call(f"{server.url}/playground/{name}")
        assert status == 404, name
        assert "playground.css, playground.js" in body["error"]["message"]


def test_the_page_and_state_need_no_key_while_the_api_does(make_server):
    server = make_server(api_key="sekret")
    for path in ("/", "/state", "/playground/playground.js"):
        assert call(server.url + path)[0] == 200, path
    assert call(server.url + "/v1/models")[0] == 401


def test_state_reports_the_engine_and_the_tokens_generated(server):
    before = ServerStateView.model_validate(call(server.url + "/state")[2])
    assert before.status == "ok" and before.model == "tiny-test" and before.max_num_seqs == 4
    assert call(server.url + "/v1/completions", {**COMPLETION, "ignore_eos": True})[0] == 200
    after = ServerStateView.model_validate(call(server.url + "/state")[2])
    assert after.generation_tokens - before.generation_tokens >= 4 and after.time >= before.time
    # the same numbers /metrics exports
    assert after.generation_tokens == metric(server.url, "scalellm_generation_tokens_total")
    assert after.prefix_cache.queries == metric(server.url, "scalellm_prefix_cache_queries_total")
    if after.prefix_cache.queries:
        assert after.prefix_cache.hit_rate == after.prefix_cache.hits / after.prefix_cache.queries
    else:
        assert after.prefix_cache.hit_rate is None


def test_state_while_the_engine_runs_a_request(make_server, served):
    server = make_server()

    async def main():
        long = {**COMPLETION, "max_tokens": 50, "ignore_eos": True, "stream": True}
        async with aiohttp.ClientSession() as session, session.post(server.url + "/v1/completions",
                                                                   json=long) as stream:
            await stream.content.readline()  # the first event: the request is running
            running = await (await session.get(server.url + "/state")).json()
        return running

    running = asyncio.run(main())
    assert running["requests"]["running"] == 1 and running["kv_cache"]["pages_in_use"] > 0
    assert 0 < running["kv_cache"]["usage"] <= 1
    # the client left mid-stream: the request was aborted and its pages freed
    wait_until(lambda: (s := call(server.url + "/state")[2])["requests"]["running"] == 0
               and s["kv_cache"]["pages_in_use"] == 0)
    assert kv_pages_in_use(served) == 0


def test_state_while_loading(make_server):
    server = make_server(model=None)
    status, _, body = call(server.url + "/state")
    assert status == 200 and body["status"] == "loading" and body["max_num_seqs"] is None
    assert body["requests"] == {"running": 0, "waiting": 0, "swapped": 0}


def test_http_responses_are_counted_by_code_and_route(make_server, served):
    server = make_server(max_queued_requests=0, api_key="sekret")
    key = {"Authorization": "Bearer sekret"}
    count = lambda code, route: metric(server.url, "scalellm_http_responses_total", code=code, route=route)  # noqa: E731
    assert call(server.url + "/v1/completions", COMPLETION, headers=key)[0] == 200
    assert call(server.url + "/v1/completions", {**COMPLETION, "top_p": 3}, headers=key)[0] == 400
    assert call(server.url + "/v1/completions", COMPLETION)[0] == 401
    assert call(server.url + "/no/such/path")[0] == 404
    assert call(server.url + "/v1/completions", method="GET", headers=key)[0] == 405

    async def full_queue():  # two streams hold all 4 slots: the third request is a 429
        long = {**COMPLETION, "max_tokens": 60, "ignore_eos": True, "stream": True, "n": 2}
        async with aiohttp.ClientSession(headers=key) as session:
            streams = [await session.post(server.url + "/v1/completions", json=long) for _ in range(2)]
            async with session.post(server.url + "/v1/completions", json=COMPLETION) as third:
                status = third.status
            for stream in streams:
                stream.close()
            return status

    assert asyncio.run(full_queue()) == 429
    assert count("200", "/v1/completions") == 3  # a stream counts when its status line is sent
    assert count("400", "/v1/completions") == 1
    assert count("401", "/v1/completions") == 1
    assert count("429", "/v1/completions") == 1
    assert count("404", "unmatched") == 1 and count("405", "unmatched") == 1  # no route: a bounded label
    assert count("200", "/metrics") >= 1
    wait_until(lambda: kv_pages_in_use(served) == 0)


def test_a_pip_installed_server_has_the_page():
    """The package data globs of pyproject.toml take in every file the playground serves."""
    data = tomllib.loads((pathlib.Path(ROOT) / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = data["scalellm_jax.server"]
    package = pathlib.Path(ROOT) / "scalellm_jax" / "server"
    shipped = {p.resolve() for pattern in globs for p in package.glob(pattern)}
    for name in (playground.INDEX, *playground.ASSETS):
        assert (playground.STATIC / name).resolve() in shipped, name
