"""A server on a simulated device says so wherever its output could be mistaken for a model's."""

from __future__ import annotations

import pytest
from server_helpers import call, metric

from scalellm_jax.server import ServedModel, ServerConfig, create_app
from scalellm_jax.server.background import BackgroundServer

NAME = "mixtral-simulated"


@pytest.fixture(scope="module")
def simulated_server():
    from scalellm_jax import LLM
    from scalellm_jax.engine.async_engine import AsyncEngine

    llm = LLM("mixtral-8x7b", simulate_device="h100", tensor_parallel_size=2,  # 8x7B needs two H100s
              max_num_seqs=8, max_num_batched_tokens=64, max_model_len=512)
    served = ServedModel.wrap(NAME, AsyncEngine(llm.engine), llm.tokenizer)
    try:
        with BackgroundServer(create_app(ServerConfig(model_name=NAME, simulated_device="h100"), served)) as running:
            yield running
    finally:
        served.engine.shutdown()


def test_models_and_metrics_name_the_simulated_device(simulated_server):
    import openai

    client = openai.OpenAI(base_url=simulated_server.url + "/v1", api_key="unused")
    [card] = client.models.list().data
    assert card.id == NAME and card.model_extra["simulated_device"] == "h100"
    assert metric(simulated_server.url, "scalellm_simulated_device_info", device="h100") == 1.0
    stream = client.completions.create(model=NAME, prompt="Hello", max_tokens=6, stream=True)
    assert sum(len(chunk.choices[0].text) > 0 for chunk in stream if chunk.choices) >= 1


def test_a_real_engine_is_not_marked(server):
    status, _, body = call(server.url + "/v1/models")
    assert status == 200
    assert "simulated_device" not in body["data"][0]
    assert metric(server.url, "scalellm_simulated_device_info", device="h100") == 0.0


def test_the_config_must_match_the_served_engine(served):
    with pytest.raises(ValueError, match="simulated device"):
        create_app(ServerConfig(model_name="tiny-test", simulated_device="h200"), served)
