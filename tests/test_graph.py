"""The decoder graph ecdcfs writes from a checkpoint's weights (:mod:`ecdcfs.graph`): each
layer equals encodec's own layer, the whole graph equals torch's TorchScript export of
encodec's decoder bit for bit, and a checkpoint that is not the model's is refused."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
import torch
from encodec.modules.conv import SConv1d, SConvTranspose1d
from encodec.modules.lstm import SLSTM
from encodec.modules.seanet import SEANetResnetBlock
from onnx import TensorProto, helper
from torch import nn

import synth
import torchscript_graph
from ecdcfs import graph
from ecdcfs.checkpoint import CHECKPOINTS, checkpoint_path
from ecdcfs.container import MODELS
from ecdcfs.decoder import ModelUnavailable
from ecdcfs.onnx_decoder import new_session
from ecdcfs.torch_decoder import encodec_model
from ecdcfs.torchfile import read_state_dict

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")  # encodec's

# encodec's norms, causal or not (it refuses a causal GroupNorm)
STYLES = [
    ("none", False),
    ("none", True),
    ("weight_norm", False),
    ("weight_norm", True),
    ("time_group_norm", False),
]


def randomised(layer: nn.Module) -> nn.Module:
    """``layer`` with every parameter redrawn (GroupNorm's affine is 1 and 0 at init)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(0, 0.5)
    return layer.eval()


def run_layer(
    layer: nn.Module,
    write: Callable[[graph._Decoder, str], str],
    x: torch.Tensor,
    norm: str = "none",
    causal: bool = False,
    **spec: object,
) -> np.ndarray:
    """The graph form of ``layer`` (written by ``write`` from its state dict under the key
    ``layer``) run by ONNX Runtime on ``x`` ``[1, C, T]``."""
    spec_ = dataclasses.replace(MODELS["encodec_24khz"], norm=norm, causal=causal, **spec)
    state = {f"layer.{k}": v.detach().numpy() for k, v in layer.state_dict().items()}
    weights, nodes = graph._Weights("test", state), graph._Graph()
    out = write(graph._Decoder(spec_, weights, nodes), "x")
    weights.check_all_taken("layer.")
    model = helper.make_model(
        helper.make_graph(
            nodes.nodes,
            "layer",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, x.shape[1], 1, None])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
            nodes.initializers,
        ),
        opset_imports=[helper.make_opsetid("", graph.OPSET)],
    )
    model.ir_version = 8
    session = new_session(model.SerializeToString())
    return session.run(None, {"x": x.numpy()[:, :, None, :]})[0][:, :, 0, :]


def assert_like(layer: nn.Module, actual: np.ndarray, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = layer(x).numpy()
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("norm", "causal"), STYLES)
@pytest.mark.parametrize(
    ("kernel", "stride"), [(16, 8), (10, 5), (8, 4), (4, 2), (5, 2), (3, 3), (7, 3), (2, 1)]
)
def test_transposed_convolution_is_encodecs(norm, causal, kernel, stride):
    layer = randomised(SConvTranspose1d(6, 5, kernel, stride, causal=causal, norm=norm))
    for length in (1, 2, 7, 40):
        x = torch.randn(1, 6, length)
        actual = run_layer(
            layer,
            lambda d, x: d.conv_transpose(x, "layer", (6, 5, kernel), stride),
            x,
            norm,
            causal,
        )
        assert_like(layer, actual, x)


@pytest.mark.parametrize("trim_right_ratio", [0.0, 0.5, 1.0])
def test_causal_transposed_convolution_trims_like_encodec(trim_right_ratio):
    layer = randomised(
        SConvTranspose1d(6, 5, 10, 4, causal=True, trim_right_ratio=trim_right_ratio)
    )
    x = torch.randn(1, 6, 13)
    write = lambda d, x: d.conv_transpose(x, "layer", (6, 5, 10), 4)  # noqa: E731
    actual = run_layer(layer, write, x, causal=True, trim_right_ratio=trim_right_ratio)
    assert_like(layer, actual, x)


@pytest.mark.parametrize(("norm", "causal"), STYLES)
@pytest.mark.parametrize(("kernel", "dilation"), [(7, 1), (3, 1), (3, 3), (1, 1), (2, 2)])
def test_convolution_is_encodecs(norm, causal, kernel, dilation):
    layer = randomised(SConv1d(6, 5, kernel, dilation=dilation, causal=causal, norm=norm))
    # inside the decoder, inputs are always longer than the reflect padding
    for length in (7, 9, 40):
        x = torch.randn(1, 6, length)
        write = lambda d, x: d.conv(x, "layer", (6, 5, kernel), dilation)  # noqa: E731
        assert_like(layer, run_layer(layer, write, x, norm, causal), x)


def test_group_norm_is_torchs_with_a_large_mean():
    layer = randomised(SConv1d(4, 4, 1, norm="time_group_norm"))
    with torch.no_grad():  # a convolution that passes its input through
        layer.conv.conv.weight.copy_(torch.eye(4)[:, :, None])
        layer.conv.conv.bias.zero_()
    x = torch.randn(1, 4, 5000) * 0.01 + 30  # the mean dwarfs the spread
    actual = run_layer(layer, lambda d, x: d.conv(x, "layer", (4, 4, 1)), x, "time_group_norm")
    with torch.no_grad():
        expected = layer(x).numpy()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=2e-4)


def test_lstm_is_encodecs():
    layer = randomised(SLSTM(6, num_layers=2))
    x = torch.randn(1, 6, 30)
    assert_like(layer, run_layer(layer, lambda d, x: d.lstm(x, "layer", 6), x, lstm_layers=2), x)


@pytest.mark.parametrize(("norm", "causal"), STYLES)
def test_residual_block_is_encodecs(norm, causal):
    layer = SEANetResnetBlock(
        8, kernel_sizes=[3, 1], dilations=[2, 1], norm=norm, causal=causal, true_skip=False
    )
    layer = randomised(layer)
    x = torch.randn(1, 8, 25)
    write = lambda d, x: d.residual(x, "layer", 8, 2)  # noqa: E731
    assert_like(layer, run_layer(layer, write, x, norm, causal, residual_kernel_size=3), x)


def test_elu_is_torchs_within_one_ulp_of_one():
    x = torch.cat(
        [
            torch.linspace(-100, 100, 200_001),
            torch.tensor([0.0, -0.0, 1e-30, -1e-30, -1e-7, 1e-7, -88.0, 88.0, 1e30, -1e30]),
        ]
    )[None, None]
    actual = run_layer(nn.Identity(), lambda d, x: d.elu(x), x)
    np.testing.assert_allclose(actual, nn.ELU()(x).numpy(), rtol=0, atol=1.2e-7)


@pytest.mark.parametrize("name", MODELS)
def test_the_spec_states_encodecs_architecture(torch_home, name):
    spec = MODELS[name]
    model = encodec_model(spec, pretrained=False)
    decoder = model.decoder
    first, lstm = decoder.model[0], decoder.model[1]
    transposed = [m for m in decoder.model if isinstance(m, SConvTranspose1d)]
    residual = [m for m in decoder.model if isinstance(m, SEANetResnetBlock)]
    actual = {
        "sample_rate": model.sample_rate,
        "channels": model.channels,
        "normalize": model.normalize,
        "max_codebooks": model.quantizer.n_q,
        "bins": model.quantizer.bins,
        "dimension": decoder.dimension,
        "n_filters": decoder.n_filters,
        "ratios": tuple(decoder.ratios),
        "hop": int(decoder.hop_length),
        "norm": first.conv.norm_type,
        "causal": first.causal,
        "pad_mode": first.pad_mode,
        "kernel_size": first.conv.conv.kernel_size[0],
        "last_kernel_size": decoder.model[-1].conv.conv.kernel_size[0],
        "residual_kernel_size": residual[0].block[1].conv.conv.kernel_size[0],
        "dilation_base": residual[0].block[1].conv.conv.dilation[0] * 2,
        "n_residual_layers": len(residual) // len(transposed),
        "compress": residual[0].block[1].conv.conv.in_channels
        // residual[0].block[1].conv.conv.out_channels,
        "lstm_layers": lstm.lstm.num_layers,
        "trim_right_ratio": transposed[0].trim_right_ratio,
    }
    assert actual == {key: getattr(spec, key) for key in actual}
    assert [m.convtr.convtr.kernel_size[0] for m in transposed] == [2 * r for r in spec.ratios]


def exported_and_built(name: str) -> tuple[bytes, graph.DecoderGraph]:
    """torch's TorchScript export of encodec's decoder, and ecdcfs's graph, of one model."""
    spec = MODELS[name]
    model = encodec_model(spec)
    exported = torchscript_graph.export_graph(model.decoder)
    built = graph.build_graph(spec, read_state_dict(checkpoint_path(CHECKPOINTS[name])))
    return exported, built


# Lengths on either side of the first convolution's reflect padding, the 24 kHz chunk grid
# (375 + 75 steps) and a whole 48 kHz frame.
LENGTHS = {
    "encodec_48khz": [1, 2, 3, 4, 5, 8, 9, 31, 75, 148, 149, 150],
    "encodec_24khz": [1, 2, 6, 7, 8, 74, 75, 76, 374, 375, 376, 449, 450],
}


@pytest.mark.parametrize("name", MODELS)
def test_the_built_graph_is_the_torchscript_export_bit_for_bit(torch_home, name):
    exported, built = exported_and_built(name)
    sessions = [new_session(exported), new_session(built.graph)]
    rng = np.random.default_rng(4)
    left, right = built.padding
    for steps in LENGTHS[name]:
        emb = rng.standard_normal((1, MODELS[name].dimension, steps + left + right), np.float32)
        expected, actual = (s.run(None, {"emb": emb})[0] for s in sessions)
        assert actual.shape == (1, MODELS[name].channels, steps * MODELS[name].hop)
        assert actual.tobytes() == expected.tobytes(), steps


def test_weight_norm_folds_as_torch_does():
    """Bit for bit where torch sums with AVX2 (this VM, CI); within one ulp elsewhere."""
    rng = np.random.default_rng(2)
    bit_exact = torch.backends.cpu.get_cpu_capability() == "AVX2"
    for shape in ((5, 3, 1), (7, 2, 3), (16, 32, 7), (32, 512, 3), (3, 1, 5)):
        v = rng.standard_normal(shape, np.float32)
        g = rng.standard_normal((shape[0], 1, 1), np.float32)
        expected = torch._weight_norm(torch.from_numpy(v), torch.from_numpy(g), 0).numpy()
        actual = v * (g / graph.row_norms(v.reshape(shape[0], -1))[:, None, None])
        if bit_exact:
            assert actual.tobytes() == expected.tobytes(), shape
        else:
            np.testing.assert_allclose(actual, expected, rtol=2.5e-7, atol=0)


def state_of(name: str) -> dict[str, np.ndarray]:
    return read_state_dict(checkpoint_path(CHECKPOINTS[name]))


def test_a_checkpoint_without_a_layer_is_refused_naming_it(torch_home):
    state = state_of("encodec_48khz")
    del state["decoder.model.4.block.3.conv.conv.bias"]
    with pytest.raises(ModelUnavailable, match=r"decoder\.model\.4\.block\.3\.conv\.conv\.bias"):
        graph.build_graph(MODELS["encodec_48khz"], state)


def test_the_other_models_checkpoint_is_refused(torch_home):
    with pytest.raises(ModelUnavailable, match="not this model's"):
        graph.build_graph(MODELS["encodec_48khz"], state_of("encodec_24khz"))
    with pytest.raises(ModelUnavailable, match="not this model's"):
        graph.build_graph(MODELS["encodec_24khz"], state_of("encodec_48khz"))


def test_a_layer_of_the_wrong_shape_or_type_is_refused(torch_home):
    state = state_of("encodec_48khz")
    key = "decoder.model.1.lstm.weight_hh_l1"
    for wrong in (state[key][:, :-1], state[key].astype(np.float64)):
        with pytest.raises(ModelUnavailable, match=key.replace(".", r"\.")):
            graph.build_graph(MODELS["encodec_48khz"], {**state, key: wrong})


def test_a_checkpoint_with_layers_the_model_lacks_is_refused(torch_home):
    state = state_of("encodec_24khz")
    state["decoder.model.16.conv.conv.bias"] = np.zeros(1, np.float32)
    with pytest.raises(ModelUnavailable, match="layers this model does not"):
        graph.build_graph(MODELS["encodec_24khz"], state)


def test_an_unsupported_norm_is_refused(torch_home):
    spec = dataclasses.replace(MODELS["encodec_24khz"], norm="layer_norm")
    with pytest.raises(ModelUnavailable, match="layer_norm"):
        graph.build_graph(spec, state_of("encodec_24khz"))


def test_a_saved_graph_loads_whole_and_a_damaged_one_is_refused(torch_home):
    built = graph.build_graph(MODELS["encodec_24khz"], state_of("encodec_24khz"))
    buffer = io.BytesIO()
    built.save(buffer)
    again = graph.DecoderGraph.load(io.BytesIO(buffer.getvalue()))
    assert again.graph == built.graph and again.padding == built.padding
    assert again.codebooks.tobytes() == built.codebooks.tobytes()
    damaged = bytearray(buffer.getvalue())
    damaged[len(damaged) // 3] ^= 0x01  # inside the graph's bytes
    with pytest.raises(graph.GraphUnusable, match="CRC"):
        graph.DecoderGraph.load(io.BytesIO(bytes(damaged)))


def test_building_a_graph_imports_no_torch(torch_home, tmp_path):
    code = (
        "import sys; from ecdcfs.container import MODELS; from ecdcfs.checkpoint import *\n"
        "from ecdcfs.graph import build_graph\n"
        "from ecdcfs.onnx_decoder import new_session\n"
        "for name, file in CHECKPOINTS.items():\n"
        "    new_session(build_graph(MODELS[name], load_state_dict(file, name)).graph)\n"
        "assert 'torch' not in sys.modules and 'encodec' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    assert synth.CHECKPOINT_FILES  # the checkpoints it read are the seeded ones
