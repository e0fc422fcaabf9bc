"""``python -m scalellm_jax.server``: --help, one-line errors for bad options, and the start-up sequence."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import threading

import pytest
from server_helpers import MODEL, call, wait_until

from scalellm_jax.server import __main__ as cli


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--host", "--port", "--scheduling-policy", "--tensor-parallel-size",
                   "--expert-parallel-size", "--api-key", "--max-queued-requests", "--shutdown-grace-s",
                   "--keepalive-timeout-s", "--request-read-timeout-s", "--max-connections", "--no-prefix-caching"):
        assert option in out


@pytest.mark.parametrize("argv, option", [
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--max-num-seqs", "many"], "--max-num-seqs"),
    (["--scheduling-policy", "nope"], "--scheduling-policy"),
    (["--model", "/no/such/folder"], "--model"),
    (["--port", "70000"], "--port"),
    (["--max-queued-requests", "-1"], "--max-queued-requests"),
    (["--tensor-parallel-size", "0"], "--tensor-parallel-size"),
    (["--kv-cache-dtype", "fp4"], "--kv-cache-dtype"),
    (["--decode-buckets", "16,x"], "--decode-buckets"),
    (["--decode-buckets", "4,64"], "--decode-buckets"),  # above the demo's max_num_seqs (16)
    (["--decode-buckets", "0"], "--decode-buckets"),
    (["--token-buckets", ""], "--token-buckets"),
    (["--simulate-device", "tpu-v9"], "--simulate-device"),
    (["--simulate-lengths", "rows.jsonl"], "--simulate-lengths"),  # without --simulate-device
    (["--simulate-device", "h200", "--simulate-lengths", "/no/such.jsonl"], "--simulate-lengths"),
    (["--token-buckets", "16,4096", "--max-num-batched-tokens", "2048"], "--token-buckets"),
    (["--allowed-origins", "ftp://files.example.com"], "--allowed-origins"),
    (["--allowed-origins", "[\"https://a.example\", 3]"], "--allowed-origins"),
    (["--allow-credentials"], "--allow-credentials"),  # without --allowed-origins
    (["--shutdown-grace-s", "-1"], "--shutdown-grace-s"),
    (["--keepalive-timeout-s", "0"], "--keepalive-timeout-s"),
    (["--request-read-timeout-s", "nan"], "--request-read-timeout-s"),
    (["--max-connections", "0"], "--max-connections"),
    # cross-field and against the model's config: before anything loads
    (["--max-num-seqs", "64", "--max-num-batched-tokens", "32"], "--max-num-batched-tokens"),
    (["--model", "tiny", "--tensor-parallel-size", "8"], "--tensor-parallel-size"),
    (["--model", "tiny", "--expert-parallel-size", "3"], "--expert-parallel-size"),
    (["--model", "tiny", "--max-model-len", "100000"], "--max-model-len"),
])
def test_bad_options_exit_2_with_one_line(capsys, monkeypatch, argv, option):
    monkeypatch.setattr(cli, "load", lambda *args: pytest.fail("a bad option must fail before loading"))
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and option in err and "\n" not in err, err


def test_allowed_origins_take_vllm_json_lists_and_comma_lists():
    for text in ('["https://a.example", "http://b.example:8080"]', "https://a.example, http://b.example:8080"):
        config = cli.server_config(cli.parse_args(["--allowed-origins", text, "--allow-credentials"]))
        assert config.allowed_origins == ("https://a.example", "http://b.example:8080") and config.allow_credentials


def test_bucket_flags_become_engine_config_fields():
    options = cli.engine_options(cli.parse_args(["--model", "tiny", "--max-num-seqs", "32", "--decode-buckets",
                                                 "16,4,16", "--token-buckets", "256"]))
    assert options == {"max_num_seqs": 32, "decode_buckets": (16, 4, 16), "token_buckets": (256,)}
    config = cli.EngineConfig(**options)
    assert (config.decode_buckets, config.token_buckets) == ((4, 16), (256,))


@pytest.mark.parametrize("argv, enabled", [
    ([], True), (["--no-prefix-caching"], False), (["--no-enable-prefix-caching"], False),
    (["--enable-prefix-caching"], True),
])
def test_prefix_caching_is_on_unless_turned_off(argv, enabled):
    options = cli.engine_options(cli.parse_args(["--model", "tiny", *argv]))
    assert cli.EngineConfig(**options).enable_prefix_caching is enabled


def test_a_folder_without_a_checkpoint_fails_loading_in_one_line(tmp_path, capsys):
    assert cli.main(["--model", str(tmp_path), "--port", "0", "--compilation-cache-dir", ""]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model: cannot load") and "\n" not in err, err


def test_listens_at_once_then_logs_ready_and_stops_on_sigterm(monkeypatch, served, caplog):
    """The real start-up sequence, with loading replaced by the already-built test engine."""
    release = threading.Event()

    class Shared:  # the session's engine must outlive this server
        def __getattr__(self, name):
            return getattr(served.engine, name)

        def shutdown(self, timeout=None):
            pass

    def fake_load(args, name, options):
        assert options["max_num_seqs"] == 3 and name == MODEL
        release.wait(30)
        return dataclasses.replace(served, engine=Shared())

    monkeypatch.setattr(cli, "load", fake_load)
    caplog.set_level(logging.INFO, logger="scalellm_jax.server")
    seen = {}

    def drive():
        url = wait_until(lambda: _logged_url(caplog.messages), timeout=30)
        try:  # the server listens, so its SIGTERM handler is installed
            seen["loading"] = call(url + "/health")[0]
            release.set()
            wait_until(lambda: any(m.startswith("ready in") for m in caplog.messages), timeout=30)
            seen["ready"] = call(url + "/health")[0]
            seen["completion"] = call(url + "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2})[0]
        finally:
            release.set()
            os.kill(os.getpid(), signal.SIGTERM)

    driver = threading.Thread(target=drive)
    driver.start()
    code = cli.main(["--model", "tiny", "--served-model-name", MODEL, "--port", "0", "--max-num-seqs", "3"])
    driver.join(30)
    assert code == 0 and seen == {"loading": 503, "ready": 200, "completion": 200}
    assert any(m == "shut down" for m in caplog.messages)


def _logged_url(messages: list[str]) -> str | None:
    for message in messages:
        match = re.match(r"listening on (http://\S+)", message)
        if match:
            return match.group(1)
    return None


def _exit_code(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code
