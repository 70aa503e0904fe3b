"""The per-layer closed forms of :mod:`metareweight.core.capture` against autograd, layer by layer."""

import pytest
import torch
from torch import nn

from metareweight.core.capture import capture_calls

LAYERS = {
    "linear": (lambda: nn.Linear(6, 4), (5, 6)),
    "linear_3d_input": (lambda: nn.Linear(6, 4), (5, 3, 6)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (5, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(2, 4, 3, padding=1), (5, 2, 6, 6)),
    "conv2d_strided_dilated_grouped": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
                                       (5, 4, 9, 9)),
    "conv2d_same": (lambda: nn.Conv2d(2, 3, 3, padding="same"), (5, 2, 7, 7)),
    "conv2d_reflect": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (5, 2, 6, 6)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, bias=False), (5, 2, 4, 4, 4)),
    "embedding": (lambda: nn.Embedding(7, 4, padding_idx=0), None),
    "layer_norm": (lambda: nn.LayerNorm(6), (5, 3, 6)),
    "layer_norm_2d_shape": (lambda: nn.LayerNorm((3, 6)), (5, 3, 6)),
    "rms_norm": (lambda: nn.RMSNorm(6, eps=1e-5), (5, 3, 6)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_weight_and_bias_gradients_and_per_sample_dots_match_autograd(name):
    torch.manual_seed(0)
    make, shape = LAYERS[name]
    layer = make().double()
    x = torch.randint(0, 7, (5, 3)) if shape is None else torch.randn(*shape, dtype=torch.float64)
    with capture_calls(layer, lambda m, c: None) as calls:
        out = layer(x)
    call = calls[0].detach()
    delta = torch.randn_like(out)
    bias = getattr(layer, "bias", None)
    grads = torch.autograd.grad(out, [layer.weight] + ([] if bias is None else [bias]), delta)
    torch.testing.assert_close(call.weight_grad(delta), grads[0], rtol=1e-12, atol=1e-12)
    if bias is not None:
        torch.testing.assert_close(call.bias_grad(delta), grads[1], rtol=1e-12, atol=1e-12)
    # per-sample: <∇_W ℓ_i, U> from one forward with weight U equals the per-sample gradient's inner product
    U = torch.randn_like(layer.weight)
    ours = call.per_sample_dot(delta, call.op(U))
    for i in range(x.shape[0]):
        g_i = torch.autograd.grad(layer(x[i:i + 1]), layer.weight, delta[i:i + 1])[0]
        torch.testing.assert_close(ours[i], (g_i * U).sum(), rtol=1e-10, atol=1e-12)
