from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bulkfm.errors import ConfigError
from bulkfm.models.heads import MLPHead, classification_head, survival_head

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def layer_types(head: MLPHead) -> list[type]:
    return [type(m) for m in head.body] + [type(head.output)]


def test_classification_head_is_paper_architecture():
    head = classification_head(16, 5)
    assert layer_types(head) == [nn.Linear, nn.SELU, nn.Dropout, nn.LayerNorm] * 2 + [nn.Linear]
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 256), (256, 128), (128, 5)]
    assert head(torch.randn(3, 16)).shape == (3, 5)


def test_survival_head_hidden_512_256_one_output():
    head = survival_head(8, dropout=0.0)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 512), (512, 256), (256, 1)]
    assert head(torch.randn(4, 8)).shape == (4, 1)


def test_options_linear_head_and_no_layer_norm():
    assert layer_types(MLPHead(4, 2, hidden=())) == [nn.Linear]
    no_ln = MLPHead(4, 2, hidden=(3,), layer_norm=False)
    assert layer_types(no_ln) == [nn.Linear, nn.SELU, nn.Dropout, nn.Linear]


def test_forward_equals_functional_reference():
    torch.manual_seed(0)
    head = MLPHead(6, 3, hidden=(5, 4), dropout=0.3).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-trivial LayerNorm scale/bias too
    x = torch.randn(7, 6)
    h = x
    lin = [m for m in head.body if isinstance(m, nn.Linear)]
    lns = [m for m in head.body if isinstance(m, nn.LayerNorm)]
    for linear, ln in zip(lin, lns, strict=True):
        h = F.selu(h @ linear.weight.T + linear.bias)
        h = F.layer_norm(h, (h.shape[1],), ln.weight, ln.bias, eps=ln.eps)
    expected = h @ head.output.weight.T + head.output.bias
    torch.testing.assert_close(head(x), expected)


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    head = MLPHead(6, 2, hidden=(32,), dropout=0.5)
    x = torch.randn(4, 6)
    head.eval()
    torch.testing.assert_close(head(x), head(x))
    head.train()
    assert not torch.allclose(head(x), head(x))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_dim": 0, "out_dim": 2}, "in_dim must be a positive integer"),
        ({"in_dim": 4, "out_dim": 2, "dropout": 1.0}, r"dropout must lie in \[0, 1\)"),
        ({"in_dim": 4, "out_dim": 2, "hidden": (8, 0)}, "hidden size must be a positive"),
        ({"in_dim": 4, "out_dim": 2, "hidden": 8}, "sequence of layer sizes"),
    ],
)
def test_bad_head_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MLPHead(**kwargs)


def test_bad_input_shape():
    with pytest.raises(ConfigError, match=r"expects inputs \[batch, 4\]"):
        MLPHead(4, 2)(torch.randn(3, 5))


def test_classification_head_needs_two_classes():
    with pytest.raises(ConfigError, match="n_classes must be >= 2"):
        classification_head(4, 1)
