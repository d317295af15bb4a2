"""Each built-in policy's selection on constructed keys, and the checks on what a policy returns."""

from __future__ import annotations

import pytest
import torch

from kvcompare.plugins import get_registry
from kvcompare.policy import PolicyError, check_selection


def keys_with_norms(norms: torch.Tensor, head_dim: int = 4) -> torch.Tensor:
    """Keys whose L2 norm per slot is ``norms`` (shape [layers, batch, heads, length])."""
    direction = torch.zeros(head_dim)
    direction[0] = 1.0
    return norms.unsqueeze(-1) * direction


def test_streaming_keeps_sinks_and_window() -> None:
    policy = get_registry().build("streaming:start_size=2")
    kept = policy.select(torch.randn(2, 1, 3, 10, 4), 5, torch.arange(10).expand(2, 1, 3, 10))
    assert kept.shape == (2, 1, 3, 5)
    assert kept[1, 0, 2].tolist() == [0, 1, 7, 8, 9]


def test_recent_keeps_the_window() -> None:
    kept = get_registry().build("recent").select(torch.randn(1, 1, 2, 10, 4), 3, torch.arange(10).expand(1, 1, 2, 10))
    assert kept[0, 0, 1].tolist() == [7, 8, 9]


def test_l2_keeps_lowest_norms_per_head() -> None:
    norms = torch.tensor([[[[5.0, 1.0, 4.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0]]]])  # [1, 1, 2, 5]
    keys = keys_with_norms(norms)
    low = get_registry().build("l2").select(keys, 2, torch.arange(5).expand(1, 1, 2, 5))
    assert low[0, 0].tolist() == [[1, 3], [0, 1]]
    high = get_registry().build("l2:mode=keep_high").select(keys, 2, torch.arange(5).expand(1, 1, 2, 5))
    assert high[0, 0].tolist() == [[0, 2], [3, 4]]


def test_l2_random_is_reproducible_for_a_seed_and_differs_across_seeds() -> None:
    keys = torch.randn(3, 1, 2, 64, 4)
    positions = torch.arange(64).expand(3, 1, 2, 64)
    pick = lambda spec: get_registry().build(spec).select(keys, 16, positions)  # noqa: E731
    first, again, other = pick("l2:mode=random:seed=7"), pick("l2:mode=random:seed=7"), pick("l2:mode=random:seed=8")
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    check_selection(get_registry().build("l2:mode=random"), first, keys.shape, 16)
    assert not torch.equal(first[0], first[1])  # layers and heads draw independently


@pytest.mark.parametrize(
    "kept,message",
    [
        (torch.tensor([[[[0, 1]]]]), "shape"),
        (torch.tensor([[[[0, 1, 9]]]]), "outside"),
        (torch.tensor([[[[0, 0, 1]]]]), "repeated or unsorted"),
        (torch.tensor([[[[2, 1, 0]]]]), "repeated or unsorted"),
        (torch.tensor([[[[0.0, 1.0, 2.0]]]]), "integer"),
    ],
)
def test_bad_selections_name_the_policy_and_plugin(kept: torch.Tensor, message: str) -> None:
    with pytest.raises(PolicyError, match=message) as info:
        check_selection(get_registry().build("recent").bound_to("my-plugin"), kept, torch.Size([1, 1, 1, 5, 4]), 3)
    assert "'recent'" in str(info.value) and "my-plugin" in str(info.value)


def test_unknown_names_suggest_the_closest() -> None:
    registry = get_registry()
    with pytest.raises(
        PolicyError, match="Did you mean 'streaming'.*full, h2o, keydiff, l2, recent, snapkv, streaming, tova"
    ):
        registry.build("stremaing")
    with pytest.raises(PolicyError, match="Did you mean 'mode'"):
        registry.build("l2:mdoe=random")
    with pytest.raises(PolicyError, match="not one of keep_low, keep_high, random"):
        registry.build("l2:mode=rand")
    with pytest.raises(PolicyError, match="not a valid int"):
        registry.build("streaming:start_size=many")


def test_labels_show_only_changed_parameters() -> None:
    registry = get_registry()
    assert registry.build("l2").label() == "l2"
    assert registry.build("l2:mode=random:seed=0").label() == "l2:mode=random"
    assert registry.build("streaming:start_size=8").params() == {"start_size": 8}
