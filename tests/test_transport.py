"""``server.transport_dtype``: 16-bit adapters halve the bytes, round by at most half an ulp, and
the embedded and Flower engines still agree bit for bit."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, RecordDict
from safetensors.torch import load_file

from fedmoa.federation.client import through_transport, transport_bytes
from fedmoa.federation.config import load_experiment
from fedmoa.federation.flower.records import adapter_to_record, record_to_adapter
from fedmoa.federation.flower.server_app import serve
from fedmoa.federation.flower.settings import EXPERIMENT_KEY, RUN_DIR_KEY
from fedmoa.runs import RunDirectory
from test_embedded import run_embedded, write_experiment
from test_flower import LoopbackGrid, task_identity  # noqa: F401 (fixture)


def without_timings(records: list[dict]) -> list[dict]:
    """Records without their wall-clock fields, the only ones allowed to differ."""
    return [
        {k: v for k, v in r.items() if k not in ("seconds", "step_time") and "timing" not in k}
        for r in records
    ]


def adapter() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "layer.lora_A.weight": torch.randn(8, 32, generator=generator),
        "layer.lora_B.weight": torch.randn(32, 8, generator=generator) * 1e-6,  # fp16 subnormals
        "tiny": torch.tensor([1e-9, -3e-8, 0.0, 65000.0]),
    }


def test_16_bit_transport_halves_the_bytes():
    a = adapter()
    full = transport_bytes(a, "float32")
    assert full == sum(t.numel() * 4 for t in a.values())
    assert transport_bytes(a, "float16") == transport_bytes(a, "bfloat16") == full // 2
    # The Flower payload halves too (up to numpy's per-array header).
    payload = {
        t: sum(len(x.data) for x in adapter_to_record(a, t).values())
        for t in ("float32", "float16")
    }
    assert payload["float16"] - full // 2 == payload["float32"] - full  # same headers


@pytest.mark.parametrize(
    ("transport", "mantissa_bits", "smallest_subnormal_exp"),
    [("float16", 10, -24), ("bfloat16", 7, -133)],
)
def test_round_trip_changes_the_adapter_by_at_most_half_an_ulp(
    transport, mantissa_bits, smallest_subnormal_exp
):
    a = adapter()
    back = through_transport(a, transport)
    for name, tensor in a.items():
        assert back[name].dtype == tensor.dtype
        error = (back[name] - tensor).abs()
        bound = torch.maximum(
            tensor.abs() * 2.0 ** -(mantissa_bits + 1),
            torch.full_like(tensor, 2.0 ** (smallest_subnormal_exp - 1)),
        )
        assert bool((error <= bound).all()), name
    assert not torch.equal(back["layer.lora_A.weight"], a["layer.lora_A.weight"])
    # Rounding twice is rounding once: what the server sends down arrives unchanged.
    again = through_transport(back, transport)
    assert all(torch.equal(again[k], back[k]) for k in back)
    # Through Flower's records: the same values, bit for bit, back in float32.
    record = record_to_adapter(adapter_to_record(a, transport), like=a, transport_dtype=transport)
    assert all(record[k].dtype == torch.float32 and torch.equal(record[k], back[k]) for k in a)


def test_float32_transport_is_the_identity():
    a = adapter()
    assert through_transport(a, "float32") is a
    back = record_to_adapter(adapter_to_record(a), like=a)
    assert all(torch.equal(back[k], a[k]) for k in a)


def with_transport(config, transport: str):
    text = config.read_text().replace("[server]\n", f'[server]\ntransport_dtype = "{transport}"\n')
    config.write_text(text)
    assert load_experiment(config).server.transport_dtype == transport
    return config


def test_engines_agree_bit_for_bit_with_a_float16_transport(tmp_path, task_identity):  # noqa: F811
    """The embedded engine, and the Flower ServerApp and ClientApps exchanging real Flower
    messages (in one process, no Ray), with a float16 transport: identical adapters and
    records, half the bytes, and a result that differs from the float32 transport's."""
    config = with_transport(write_experiment(tmp_path, "fedmoa", rounds=2), "float16")
    embedded_run = tmp_path / "embedded"
    federation, _ = run_embedded(config, embedded_run)

    flower_run = tmp_path / "flower"
    run_config = {EXPERIMENT_KEY: str(config), RUN_DIR_KEY: str(flower_run)}
    grid = LoopbackGrid({30: 2, 10: 1, 20: 0}, run_config, failing=set())
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    serve(grid, context)

    for name in ("global", "task-math", "task-chain"):
        expected = load_file(embedded_run / "adapters" / name / "adapter_model.safetensors")
        got = load_file(flower_run / "adapters" / name / "adapter_model.safetensors")
        assert expected.keys() == got.keys()
        assert all(torch.equal(got[k], v) for k, v in expected.items()), name
    embedded_records = federation.run.read_metrics()
    assert without_timings(RunDirectory(flower_run).read_metrics()) == without_timings(
        embedded_records
    )
    start = federation.server.state.global_adapter
    half = sum(t.numel() for t in start.values()) * 2
    clients = [r for r in embedded_records if r["type"] == "client"]
    assert {(r["bytes_down"], r["bytes_up"]) for r in clients} == {(half, half)}

    (tmp_path / "f32").mkdir()
    reference_config = with_transport(
        write_experiment(tmp_path / "f32", "fedmoa", rounds=2), "float32"
    )
    reference, _ = run_embedded(reference_config, tmp_path / "f32" / "run")
    final32 = reference.server.state.global_adapter
    assert any(not torch.equal(start[k], final32[k]) for k in start)
