"""The exported decoder's layers (:mod:`ecdcfs.graph`): each equals encodec's own layer,
run on the 2-D ``[batch, channels, 1, time]`` layout the graph uses."""

from __future__ import annotations

import pytest
import torch
from encodec.modules.conv import SConv1d, SConvTranspose1d
from torch import nn

from ecdcfs import graph

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")  # encodec's

# encodec's norms, causal or not (it refuses a causal GroupNorm)
STYLES = [
    ("none", False),
    ("none", True),
    ("weight_norm", False),
    ("weight_norm", True),
    ("time_group_norm", False),
]


def as_2d(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module`` (a graph layer) applied to ``x`` ``[B, C, T]`` through the 2-D layout."""
    with torch.no_grad():
        return module(x.unsqueeze(2)).squeeze(2)


def randomised(layer: nn.Module) -> nn.Module:
    """``layer`` with every parameter redrawn (GroupNorm's affine is 1 and 0 at init)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(0, 0.5)
    return layer.eval()


def assert_like_encodec(layer: nn.Module, lengths: tuple[int, ...]) -> None:
    """The graph's form of encodec's ``layer`` gives its samples at each input length."""
    for length in lengths:
        x = torch.randn(1, 6, length)
        with torch.no_grad():
            expected = layer(x)
        actual = as_2d(graph.exportable(layer), x)
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("norm", "causal"), STYLES)
@pytest.mark.parametrize(
    ("kernel", "stride"), [(16, 8), (10, 5), (8, 4), (4, 2), (5, 2), (3, 3), (7, 3), (2, 1)]
)
def test_transposed_convolution_is_encodecs(norm, causal, kernel, stride):
    layer = randomised(SConvTranspose1d(6, 5, kernel, stride, causal=causal, norm=norm))
    assert_like_encodec(layer, (1, 2, 7, 40))


@pytest.mark.parametrize(("norm", "causal"), STYLES)
@pytest.mark.parametrize(("kernel", "dilation"), [(7, 1), (3, 1), (3, 3), (1, 1), (2, 2)])
def test_convolution_is_encodecs(norm, causal, kernel, dilation):
    layer = randomised(SConv1d(6, 5, kernel, dilation=dilation, causal=causal, norm=norm))
    # inside the decoder, inputs are always longer than the reflect padding
    assert_like_encodec(layer, (7, 9, 40))


def test_group_norm_is_torchs_with_a_large_mean():
    norm = randomised(nn.GroupNorm(1, 4))
    x = torch.randn(1, 4, 5000) * 0.01 + 30  # the mean dwarfs the spread
    with torch.no_grad():
        expected = norm(x)
    torch.testing.assert_close(as_2d(graph.exportable(norm), x), expected, rtol=0, atol=2e-4)


def test_elu_is_torchs_within_one_ulp_of_one():
    x = torch.cat(
        [
            torch.linspace(-100, 100, 200_001),
            torch.tensor([0.0, -0.0, 1e-30, -1e-30, -1e-7, 1e-7, -88.0, 88.0, 1e30, -1e30]),
        ]
    )
    expected = nn.ELU()(x)
    actual = graph.exportable(nn.ELU())(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1.2e-7)


def test_elu_other_than_alpha_one_is_refused():
    with pytest.raises(graph.GraphUnusable, match="alpha"):
        graph.exportable(nn.ELU(alpha=0.5))


@pytest.mark.parametrize("trim_right_ratio", [0.0, 0.5])
def test_causal_transposed_convolution_trims_like_encodec(trim_right_ratio):
    layer = SConvTranspose1d(6, 5, 10, 4, causal=True, trim_right_ratio=trim_right_ratio)
    assert_like_encodec(randomised(layer), (1, 3, 40))


def test_layers_without_bias_are_encodecs():
    assert_like_encodec(randomised(SConv1d(6, 5, 3, bias=False)), (7, 40))
    transposed = SConvTranspose1d(6, 5, 8, 4)  # which has no bias option: drop it
    transposed.convtr.convtr.bias = None
    assert_like_encodec(randomised(transposed), (1, 40))


@pytest.mark.parametrize(
    "layer",
    [
        SConvTranspose1d(6, 5, 2, 3),  # kernel shorter than the stride
        nn.GroupNorm(1, 4, affine=False),
        nn.GroupNorm(2, 4),
        SConv1d(6, 5, 3, norm="layer_norm"),
    ],
    ids=["short-kernel", "group-norm-without-affine", "two-groups", "layer-norm"],
)
def test_layers_without_a_checked_form_are_refused(layer):
    with pytest.raises(graph.GraphUnusable):
        graph.exportable(layer)
