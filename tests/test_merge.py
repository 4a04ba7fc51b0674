"""Merging a fossilized seed into its host (esper_core.seeds.merge): the merged layer must compute what
host + alpha * seed computed, for every seed that is an exact linear map of the host's input, and
nothing must be merged that is not (a nonlinearity, a gate, a bias that zero padding would not carry).

Seeds are built from blueprint IR with Esper's own resolver and builder, as in training, and their
parameters are drawn at random (the builtin zero init would make every merge trivially exact)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from esper_core.blueprints.builder import build, resolve
from esper_core.blueprints.host import HostSpec
from esper_core.blueprints.ir import Blueprint
from esper_core.blueprints.library import BlueprintLibrary
from esper_core.seeds.merge import fold, linear_delta, merge_into

TOL = 1e-5


def _seed(ops: list[dict], host: nn.Module, rank: int = 3, name: str = "probe") -> nn.Module:
    kind = "linear" if isinstance(host, nn.Linear) else "conv2d"
    blueprint = Blueprint.model_validate({"name": name, "host": kind, "ops": ops})
    return _randomised(build(resolve(blueprint, HostSpec.of(host), rank)))


def _randomised(seed: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in seed.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return seed.eval()


def _check_merge(host: nn.Module, seed: nn.Module, x: torch.Tensor, alpha: float) -> nn.Module:
    with torch.no_grad():
        expected = host(x) + alpha * seed(x)
        merged = copy.deepcopy(host)
        assert merge_into(merged, seed, alpha)
        got = merged(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL
    gained_bias = host.bias is None and merged.bias is not None  # a biased seed on a bias-free host
    assert sum(p.numel() for p in merged.parameters()) == (sum(p.numel() for p in host.parameters())
                                                           + (merged.weight.shape[0] if gained_bias else 0))
    return merged


@pytest.mark.parametrize("alpha", [1.0, 0.37])
def test_the_lowrank_adapter_merges_into_its_linear_host(alpha: float) -> None:
    torch.manual_seed(0)
    host = nn.Linear(12, 7)
    seed = _randomised(build(resolve(BlueprintLibrary.discover().get("lowrank_adapter").blueprint,
                                     HostSpec.of(host), 4)))
    weight, bias = linear_delta(seed, HostSpec.of(host))
    assert bias is None and torch.allclose(weight.float(), seed[1].weight @ seed[0].weight, atol=1e-6)
    _check_merge(host, seed, torch.randn(64, 12), alpha)


def test_a_biased_linear_chain_merges_and_a_bias_free_host_gains_its_bias() -> None:
    torch.manual_seed(0)
    host = nn.Linear(10, 5, bias=False)
    seed = _seed([{"op": "linear", "in": "in", "out": 6}, {"op": "linear", "in": 6, "out": 3},
                  {"op": "linear", "in": 3, "out": "out"}], host)
    x = torch.randn(32, 10)
    expected = host(x) + seed(x)
    merged = copy.deepcopy(host)
    delta = linear_delta(seed, HostSpec.of(host))
    assert delta is not None and delta[1] is not None
    assert fold(merged, delta) is True  # the host had no bias: it gets one of `out` parameters
    assert merged.bias is not None and (merged(x) - expected).abs().max().item() <= TOL


CONV_HOSTS = [
    nn.Conv2d(4, 6, 3, stride=1, padding=1, bias=False),
    nn.Conv2d(4, 6, 3, stride=2, padding=1),
    nn.Conv2d(5, 3, (3, 1), stride=(2, 1), padding=(1, 0), dilation=(2, 1)),
    nn.Conv2d(4, 6, 1),
]
LINEAR_CONV_SEEDS = {
    "host-geometry conv, then 1x1": [{"op": "conv2d", "in": "in", "out": 5, "geometry": "host", "bias": False},
                                     {"op": "conv2d", "in": 5, "out": "out", "geometry": "same", "kernel": 1}],
    "1x1, host-geometry conv, 1x1": [{"op": "conv2d", "in": "in", "out": 3, "geometry": "same", "kernel": 1,
                                      "bias": False},
                                     {"op": "conv2d", "in": 3, "out": 4, "geometry": "host"},
                                     {"op": "conv2d", "in": 4, "out": "out", "geometry": "same", "kernel": 1}],
    "depthwise host conv, then 1x1": [{"op": "conv2d", "in": "in", "out": "in", "groups": "in", "geometry": "host",
                                       "bias": False},
                                      {"op": "conv2d", "in": "in", "out": "out", "geometry": "same", "kernel": 1}],
}


@pytest.mark.parametrize("host", CONV_HOSTS, ids=lambda h: f"k{h.kernel_size}s{h.stride}p{h.padding}d{h.dilation}")
@pytest.mark.parametrize("ops", list(LINEAR_CONV_SEEDS.values()), ids=list(LINEAR_CONV_SEEDS))
def test_linear_conv_seeds_merge_into_conv_hosts_of_any_geometry(host: nn.Conv2d, ops: list[dict]) -> None:
    torch.manual_seed(0)
    _check_merge(host, _seed(ops, host), torch.randn(8, host.in_channels, 11, 9), alpha=0.8)


def test_an_average_pool_with_host_geometry_then_a_1x1_conv_merges() -> None:
    torch.manual_seed(0)
    host = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    seed = _seed([{"op": "avg_pool"}, {"op": "conv2d", "in": "in", "out": "out", "geometry": "same", "kernel": 1}],
                 host)
    _check_merge(host, seed, torch.randn(8, 4, 10, 10), alpha=1.0)


@pytest.mark.parametrize("name", ["wide_mlp", "residual_conv", "dwsep_conv", "se_gate"])
def test_builtin_seeds_with_a_nonlinearity_are_not_mergeable(name: str) -> None:
    blueprint = BlueprintLibrary.discover().get(name).blueprint
    host = nn.Linear(12, 7) if blueprint.host == "linear" else nn.Conv2d(4, 6, 3, padding=1)
    seed = _randomised(build(resolve(blueprint, HostSpec.of(host), 4)))
    before = copy.deepcopy(host.state_dict())
    assert linear_delta(seed, HostSpec.of(host)) is None
    assert merge_into(host, seed) is False
    assert all(torch.equal(before[k], v) for k, v in host.state_dict().items())


def test_a_bias_before_a_padded_conv_is_not_merged_and_a_foreign_geometry_is_not_either() -> None:
    host = nn.Conv2d(4, 6, 3, padding=1)
    biased_first = _seed([{"op": "conv2d", "in": "in", "out": 3, "geometry": "same", "kernel": 1},
                          {"op": "conv2d", "in": 3, "out": "out", "geometry": "host"}], host)
    assert linear_delta(biased_first, HostSpec.of(host)) is None  # zero padding does not carry a constant
    other_geometry = _seed([{"op": "conv2d", "in": "in", "out": "out", "geometry": "same", "kernel": 1}], host)
    assert linear_delta(other_geometry, HostSpec.of(host)) is None  # a 1x1 seed beside a 3x3 host
    assert linear_delta(nn.Sequential(nn.Dropout(0.1)), HostSpec.of(nn.Linear(3, 3))) is None


@pytest.mark.parametrize("shape", [(8, 8), (8, 24), (24, 8)], ids=["square", "widening", "narrowing"])
def test_the_lowrank_adapter_merges_into_a_gpt2_conv1d_of_any_shape(shape: tuple[int, int]) -> None:
    """transformers' Conv1D stores its weight (in, out): a square one got the delta untransposed (a
    silently wrong model after export or `unwrap`), and a non-square one was refused (and dropped
    unmerged at fossilization)."""
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    n_in, n_out = shape
    host = conv1d(n_out, n_in)  # Conv1D(nf=out, nx=in)
    with torch.no_grad():
        host.bias.normal_()
    seed = _randomised(build(resolve(BlueprintLibrary.discover().get("lowrank_adapter").blueprint,
                                     HostSpec.of(host), 4)))
    _check_merge(host, seed, torch.randn(64, n_in), 0.6)
