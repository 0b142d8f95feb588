"""Strategy, Budget and Estimate: validation, labels, fits/missing arithmetic, JSON round-trip."""

import itertools
import json

import pytest

from planner.errors import ChunkftError
from planner.schema import Component, Tier
from planner.strategy import Budget, Estimate, OptimizerDevice, Strategy, WeightResidency

GiB = 2**30


def _space() -> list[Strategy]:
    out = []
    for c, dev, tier, staging, ckpt, weights, loss, depth, interval in itertools.product(
        (1, 4), OptimizerDevice, Tier, (None, Tier.HOST, Tier.DISK), (False, True), WeightResidency,
        (0, 256), (0, 1, 2), (1, 4),
    ):
        try:
            out.append(Strategy(chunks=c, optimizer_device=dev, state_tier=tier, grad_staging=staging,
                                checkpointing=ckpt, weights=weights, loss_chunk_tokens=loss,
                                prefetch_depth=depth, update_interval=interval))
        except ChunkftError:
            pass
    return out


def test_json_round_trip_every_valid_strategy():
    space = _space()
    assert len(space) > 500
    for s in space:
        text = json.dumps(s.to_json())
        assert Strategy.from_json(json.loads(text)) == s


def test_from_json_converts_strings_to_enums():
    s = Strategy.from_json({"chunks": 8, "optimizer_device": "host", "state_tier": "disk", "grad_staging": "host"})
    assert s.optimizer_device is OptimizerDevice.HOST and s.state_tier is Tier.DISK and s.grad_staging is Tier.HOST
    assert hash(s) == hash(Strategy(chunks=8, optimizer_device=OptimizerDevice.HOST, state_tier=Tier.DISK,
                                    grad_staging=Tier.HOST))


@pytest.mark.parametrize("kwargs, words", [
    ({"chunks": 0}, ["chunk count 0", ">= 1"]),
    ({"chunks": 2.5}, ["chunk count 2.5"]),
    ({"update_interval": 0}, ["update_interval 0"]),
    ({"prefetch_depth": -1}, ["prefetch_depth -1"]),
    ({"loss_chunk_tokens": -5}, ["loss_chunk_tokens -5"]),
    ({"state_tier": "ram"}, ["state_tier 'ram'", "'gpu', 'host', 'disk'"]),
    ({"optimizer_device": "tpu"}, ["optimizer_device 'tpu'", "'gpu', 'host'"]),
    ({"weights": "offload"}, ["weights 'offload'", "'stream'"]),
    ({"grad_staging": "host"}, ["grad_staging 'host'", "optimizer_device 'host'"]),
    ({"grad_staging": "gpu", "optimizer_device": "host", "state_tier": "host"}, ["grad_staging 'gpu'"]),
    ({"optimizer_device": "host"}, ["optimizer_device 'host'", "state_tier 'host' or 'disk'"]),
    ({"checkpointing": "yes"}, ["checkpointing 'yes'"]),
])
def test_invalid_strategies_name_the_value(kwargs, words):
    with pytest.raises(ChunkftError) as e:
        Strategy(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_disk_state_with_gpu_optimizer_is_valid():
    s = Strategy(chunks=16, state_tier=Tier.DISK)
    assert s.moves_state and s.optimizer_device is OptimizerDevice.GPU


def test_from_json_rejects_unknown_fields_and_non_objects():
    with pytest.raises(ChunkftError, match="unknown fields \\['chunk'\\]"):
        Strategy.from_json({"chunk": 4})
    with pytest.raises(ChunkftError, match="JSON object"):
        Strategy.from_json([4])


def test_labels_are_unique_where_fields_matter():
    # Fields without effect are pinned the way the solver pins them: C = 1 has no interval
    # and nothing to prefetch; prefetch matters only when state moves.
    space = [s for s in _space()
             if (s.chunks > 1 or (s.update_interval == 1 and s.prefetch_depth == 0))
             and (s.moves_state or s.prefetch_depth == 0)]
    labels = [s.label() for s in space]
    assert len(set(labels)) == len(labels)
    assert Strategy().label() == "full FT"
    assert Strategy(chunks=16, state_tier=Tier.HOST, checkpointing=True).label() == "ChunkFT C=16, state host, ckpt"


def test_budget_validation_and_round_trip():
    b = Budget(gpu_bytes=24 * GiB, host_bytes=64 * GiB)
    assert Budget.from_json(json.loads(json.dumps(b.to_json()))) == b
    for bad in (0, -1, 2.5, None, True):
        with pytest.raises(ChunkftError, match="GPU budget"):
            Budget(gpu_bytes=bad)
    with pytest.raises(ChunkftError, match="host budget -3"):
        Budget(gpu_bytes=1, host_bytes=-3)
    with pytest.raises(ChunkftError, match="unknown fields"):
        Budget.from_json({"gpu_bytes": 1, "ram": 2})


def _estimate(gpu=10 * GiB, reserved=11 * GiB, host=5 * GiB, disk=0) -> Estimate:
    return Estimate(
        strategy=Strategy(chunks=4, state_tier=Tier.HOST),
        peak_bytes={Tier.GPU: gpu, Tier.HOST: host, Tier.DISK: disk},
        components={Tier.GPU: {Component.WEIGHTS: gpu}, Tier.HOST: {Component.OPTIMIZER: host}, Tier.DISK: {}},
        reserved_bytes=reserved, step_time_s=1.5, worst_chunk=0, context_bytes=512 * 2**20,
        step_time_parts_s={"compute": 1.0, "switch": 0.5},
    )


def test_fits_holds_reserved_bytes_against_the_gpu_budget():
    e = _estimate()
    assert e.fits(Budget(gpu_bytes=11 * GiB))
    assert not e.fits(Budget(gpu_bytes=11 * GiB - 1))  # allocated fits, reserved does not
    assert e.missing(Budget(gpu_bytes=10 * GiB, host_bytes=4 * GiB, disk_bytes=1)) == {
        Tier.GPU: GiB, Tier.HOST: GiB, Tier.DISK: 0}
    assert e.missing(Budget(gpu_bytes=20 * GiB)) == {Tier.GPU: 0}  # unlimited tiers are left out
    assert e.fits_tier(Budget(gpu_bytes=20 * GiB), Tier.HOST) is None
    assert e.fits_tier(Budget(gpu_bytes=20 * GiB, host_bytes=5 * GiB), Tier.HOST) is True


def test_estimate_json_round_trip():
    e = _estimate()
    back = Estimate.from_json(json.loads(json.dumps(e.to_json())))
    assert back.to_json() == e.to_json()
    assert e.to_json()["label"] == "ChunkFT C=4, state host"
    with pytest.raises(ChunkftError, match="estimate is malformed"):
        Estimate.from_json({"strategy": {}})
