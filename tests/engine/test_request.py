import ast
import pathlib

import numpy as np
import pytest

from scalellm_jax.engine.request import (
    Request,
    RequestStatus,
    SamplingParams,
    clamp_max_tokens,
    validate_prompt,
)

ENGINE = pathlib.Path(__file__).resolve().parents[2] / "scalellm_jax" / "engine"


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.5), ("max_tokens", True),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "1"),
    ("top_k", -1), ("top_k", 1.5),
    ("top_p", 0), ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("top_p", float("nan")),
    ("seed", -1), ("seed", 2**32), ("seed", 1.0),
    ("stop_token_ids", [1, -2]), ("stop_token_ids", ["a"]), ("stop_token_ids", 5),
    ("stop", [""]), ("stop", [3]),
    ("ignore_eos", 1), ("logprobs", "yes"),
])
def test_sampling_params_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**{field: value})


def test_sampling_params_accepts_edges_and_lists():
    p = SamplingParams(max_tokens=1, temperature=0, top_k=0, top_p=1, seed=2**32 - 1,
                       stop_token_ids=[7, np.int64(9)], stop=["\n\n", "###"])
    assert p.stop_token_ids == (7, 9) and p.stop == ("\n\n", "###")
    assert SamplingParams(stop="END").stop == ("END",)
    assert hash(p) == hash(SamplingParams(max_tokens=1, temperature=0, seed=2**32 - 1,
                                          stop_token_ids=(7, 9), stop=("\n\n", "###")))
    with pytest.raises(AttributeError):
        p.max_tokens = 3  # frozen


def test_sampling_params_message_matches_spec():
    with pytest.raises(ValueError, match=r"max_tokens must be >= 1, got 0"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
        SamplingParams(top_p=0)


def make(prompt=(5, 6, 7), eos=2, **params):
    return Request("r", list(prompt), SamplingParams(**params), arrival_time=0.0, eos_token_id=eos)


def test_token_accounting():
    r = make(prompt=range(3, 13), max_tokens=4)
    assert (r.num_prompt_tokens, r.num_tokens, r.num_pending_tokens, r.is_prefilling) == (10, 10, 10, True)
    r.num_computed_tokens = 9
    assert r.num_pending_tokens == 1 and not r.is_prefilling
    r.num_computed_tokens = 10
    r.append_token(np.int32(40), -0.5)
    assert r.all_token_ids == list(range(3, 13)) + [40]
    assert type(r.output_token_ids[0]) is int and r.output_logprobs == [-0.5]
    assert (r.num_tokens, r.num_pending_tokens, r.num_output_tokens) == (11, 1, 1)
    r.append_token(41)  # no logprob given: none recorded
    assert r.output_logprobs == [-0.5]
    assert r.all_token_ids is not r.all_token_ids  # a fresh list every time
    full = r.all_token_ids
    for start in range(len(full) + 1):
        for end in range(start, len(full) + 1):
            assert r.token_ids(start, end) == full[start:end], (start, end)


def test_stop_conditions():
    assert make().check_stop() is None
    r = make(max_tokens=3)
    for token in (10, 11):
        r.append_token(token)
        assert r.check_stop() is None
    r.append_token(12)
    assert r.check_stop() is RequestStatus.FINISHED_LENGTH

    r = make(max_tokens=5)
    r.append_token(2)
    assert r.check_stop() is RequestStatus.FINISHED_STOPPED
    r = make(max_tokens=5, ignore_eos=True)
    r.append_token(2)
    assert r.check_stop() is None
    r = make(eos=None, max_tokens=5)
    r.append_token(2)
    assert r.check_stop() is None
    r = make(max_tokens=5, ignore_eos=True, stop_token_ids=[9, 2])
    r.append_token(2)
    assert r.check_stop() is RequestStatus.FINISHED_STOPPED  # ignore_eos does not disable stop ids
    r = make(max_tokens=1)
    r.append_token(2)
    assert r.check_stop() is RequestStatus.FINISHED_STOPPED  # EOS on the last allowed token is a stop


def test_status_finish_reasons():
    reasons = {s: s.finish_reason for s in RequestStatus}
    assert reasons == {
        RequestStatus.WAITING: None, RequestStatus.RUNNING: None, RequestStatus.PREEMPTED: None,
        RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
        RequestStatus.FINISHED_ABORTED: "abort", RequestStatus.FINISHED_ERROR: "error",
    }
    assert [s for s in RequestStatus if s.is_finished] == [s for s in reasons if reasons[s]]
    r = make()
    r.status = RequestStatus.FINISHED_ABORTED
    assert r.finish_reason == "abort"


def test_validate_prompt():
    validate_prompt([0, 5, 99], max_model_len=4, vocab_size=100)
    validate_prompt(np.arange(7), max_model_len=8, vocab_size=100)
    with pytest.raises(ValueError, match=r"^prompt_token_ids must not be empty"):
        validate_prompt([], 8, 100)
    with pytest.raises(ValueError, match=r"^prompt_token_ids\[2\] = 100 is outside the vocabulary \[0, 100\)"):
        validate_prompt([1, 2, 100, 101], 8, 100)
    with pytest.raises(ValueError, match=r"^prompt_token_ids\[0\] = -1"):
        validate_prompt([-1], 8, 100)
    with pytest.raises(ValueError, match=r"^prompt_token_ids"):
        validate_prompt([1.5, 2], 8, 100)
    with pytest.raises(ValueError, match=r"^prompt_token_ids: prompt has 8 tokens; the model's context is 8"):
        validate_prompt(list(range(8)), 8, 100)


def test_clamp_max_tokens():
    p = SamplingParams(max_tokens=100, temperature=0.5)
    assert clamp_max_tokens(p, num_prompt_tokens=10, max_model_len=200) is p
    q = clamp_max_tokens(p, num_prompt_tokens=150, max_model_len=200)
    assert q.max_tokens == 50 and q.temperature == 0.5
    assert clamp_max_tokens(p, 199, 200).max_tokens == 1
    with pytest.raises(ValueError):
        clamp_max_tokens(p, 200, 200)


@pytest.mark.parametrize("module", ["request", "kv_manager", "policies", "scheduler", "step_costs", "batch_width",
                                    "buckets"])
def test_host_modules_do_not_import_jax(module):
    """The host side must stay testable and importable without JAX (ARCHITECTURE.md, host-side rules)."""
    tree = ast.parse((ENGINE / f"{module}.py").read_text())
    for node in ast.walk(tree):  # imports for type annotations only never run
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    roots = {name.split(".")[0] for name in imported}
    assert not roots & {"jax", "jaxlib", "flax"}, imported
    local = {name for name in imported if name.startswith("scalellm_jax")}
    host = ("request", "kv_manager", "policies", "step_costs", "batch_width", "buckets")
    # scalellm_jax.config: plain dataclasses (checked below), where the defaults the engine shares live
    assert local <= {f"scalellm_jax.engine.{m}" for m in host} | {"scalellm_jax.config"}, local


def test_the_config_module_imports_nothing_heavy():
    tree = ast.parse((ENGINE.parent / "config.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert all(name.split(".")[0] in {"__future__", "dataclasses", "json", "pathlib", "typing"} for name in imported), \
        imported
