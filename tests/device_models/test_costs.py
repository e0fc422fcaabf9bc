"""The device cost model: step times follow the bytes and FLOPs a step really needs."""

import dataclasses

import pytest

from device_models import DEVICES, MODELS, DeviceCostModel, ModelShape, StepWork, device_profile, model_shape


def model(device="h200", name="mixtral-8x7b", **kw):
    return DeviceCostModel(device_profile(device), model_shape(name), **kw)


def test_mixtral_shapes_are_the_engine_presets():
    from scalellm_jax import preset

    for name in ("mixtral-8x7b", "mixtral-8x22b"):
        assert ModelShape.of(preset(name)) == MODELS[name]
    assert MODELS["mixtral-8x7b"].num_params == pytest.approx(46.7e9, rel=0.01)
    assert MODELS["opt-13b"].num_params == pytest.approx(13.0e9, rel=0.03)
    # OPT-13B's KV: 40 layers x K and V x 5120 wide x 2 bytes
    assert MODELS["opt-13b"].kv_bytes_per_token(2) == 40 * 2 * 5120 * 2


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="h200"):
        device_profile("tpu-v9")
    with pytest.raises(ValueError, match="opt-13b"):
        model_shape("llama-3")


def test_decode_reads_only_the_experts_its_tokens_reach():
    m = model()
    s = MODELS["mixtral-8x7b"]
    one = m.weight_bytes_read(1)
    assert one == pytest.approx(2 * (s.num_layers * (s.dense_layer_params + 2 * s.expert_params) + s.lm_head_params))
    assert m.weight_bytes_read(256) == pytest.approx(2 * (s.num_params - s.vocab_size * s.hidden_size - s.hidden_size),
                                                     rel=1e-6)
    times = [m.step_s(StepWork.decode(b, 512)) for b in (1, 8, 64, 256)]
    assert times == sorted(times)
    assert times[3] / times[0] < 5  # memory-bound: 256x the tokens for a few times the time
    # batch 1 is the weights it reads at the calibrated bandwidth, plus the fixed cost
    expected = (one + 513 * m.kv_bytes_per_token) / (4.8e12 * m.calibration.memory_efficiency)
    assert times[0] == pytest.approx(expected + m.calibration.step_overhead_s, rel=1e-3)


def test_long_prefill_is_compute_bound():
    m = model()
    work = StepWork.of_rows([(2048, 2048)])
    assert m.compute_s(work) > m.memory_s(work)
    assert work.attention_pairs == 2048 * 2049 // 2
    assert m.step_s(work) == pytest.approx(m.compute_s(work) + m.calibration.step_overhead_s)


def test_padding_costs_matmuls_but_not_kv():
    m = model()
    real = StepWork.of_rows([(100, 100)])
    padded = StepWork.of_rows([(100, 100)], padded_tokens=4096)
    assert padded.kv_tokens == real.kv_tokens and padded.num_tokens == 100
    assert m.compute_s(padded) > m.compute_s(real)


def test_int8_kv_reads_about_half_the_bytes_of_bf16():
    bf16, int8 = model(kv_itemsize=2), model(kv_itemsize=1)
    ratio = int8.kv_bytes_per_token / bf16.kv_bytes_per_token
    assert 0.5 < ratio < 0.55  # int8 values plus a float32 scale per head and token
    long = StepWork.decode(64, 16384)
    assert int8.step_s(long) < 0.8 * bf16.step_s(long)


def test_tensor_parallel_splits_the_weights_and_pays_collectives():
    one, two = model(), model(tp=2)
    assert two.weight_bytes_read(64) == pytest.approx(one.weight_bytes_read(64) / 2)
    work = StepWork.decode(64, 512)
    assert one.collective_s(work) == 0 < two.collective_s(work)
    assert two.step_s(work) < one.step_s(work)
    with pytest.raises(ValueError, match="ep must divide"):
        model(ep=3)


def test_collectives_across_hosts_go_over_the_network():
    work = StepWork.decode(64, 512)
    within, across = model(tp=2), model(tp=2, hosts=2)
    profile, efficiency = across.profile, across.calibration.interconnect_efficiency
    # the same bytes, over the network's bandwidth instead of NVLink's, plus one latency per all-reduce
    moved = within.collective_s(work) * profile.interconnect_bps * efficiency
    layers = across.shape.num_layers
    assert across.collective_s(work) == pytest.approx(moved / (profile.network_bps * efficiency)
                                                      + 2 * layers * profile.network_latency_s)
    assert across.collective_s(work) > 5 * within.collective_s(work)
    assert across.memory_s(work) == within.memory_s(work)  # only the collectives move
    # tensor=2 within each of two hosts, experts across them: only the experts' all-to-all crosses
    mixed, local = model(tp=2, ep=2, hosts=2), model(tp=2, ep=2)
    tp_part = within.collective_s(work)
    ep_moved = (local.collective_s(work) - tp_part) * profile.interconnect_bps * efficiency
    assert mixed.collective_s(work) == pytest.approx(tp_part + ep_moved / (profile.network_bps * efficiency)
                                                     + 2 * layers * profile.network_latency_s)
    assert model(tp=2, ep=2, hosts=2).describe()["hosts"] == 2
    with pytest.raises(ValueError, match="hosts must divide"):
        model(tp=2, hosts=3)


def test_swap_time_is_bytes_over_the_host_link():
    m = model("a100-40gb", "opt-13b")
    assert m.swap_s(32e9) == pytest.approx(1 / m.calibration.host_link_efficiency)
    assert m.step_s(StepWork(0, 0, 0, 0, 0)) == 0


def test_every_device_has_a_calibration_that_names_its_sources():
    for name in DEVICES:
        m = model(name)
        assert set(m.calibration.source) >= {"memory_efficiency", "step_overhead_s"}
        described = m.describe()
        assert described["device"] == name and described["calibrated_from_gpu_run"] == m.calibration.measured
        assert dataclasses.asdict(m.shape) == described["model_shape"]
