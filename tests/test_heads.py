"""Exit heads: the folded evaluation path computes what the layers compute."""

import pytest
import torch
import torch.nn.functional as F

from dynconvert.runtime.heads import ExitHead


def trained_batchnorm_head(hidden: int = 12) -> ExitHead:
    """A BatchNorm head with random weights and running statistics away from (0, 1), in eval mode."""
    torch.manual_seed(0)
    head = ExitHead((16, 8, 8), 5, pool=4, hidden=hidden, norm="batch", activation="relu")
    head.train()
    with torch.no_grad():
        for _ in range(5):
            head(torch.randn(32, 16, 8, 8) * 3 + 1)
    return head.eval()


def layer_by_layer(head: ExitHead, x: torch.Tensor) -> torch.Tensor:
    """The head's layers applied as modules, in order, to adaptively pooled features."""
    pooled = F.adaptive_avg_pool2d(x, head.pool_hw).flatten(1)
    return head.classifier(pooled)


@pytest.mark.parametrize("hidden", [12, 0])
def test_folded_batchnorm_head_equals_its_layers(hidden):
    head = trained_batchnorm_head(hidden)
    x = torch.randn(4, 16, 8, 8)
    expected = layer_by_layer(head, x)
    with torch.no_grad():
        assert torch.allclose(head(x), expected, atol=1e-5)
    with torch.inference_mode():  # the cached folding
        assert torch.allclose(head(x), expected, atol=1e-5)
        assert torch.allclose(head(x[:1]), expected[:1], atol=1e-5)
        assert torch.allclose(head.single_sample_logits(x[:1]), expected[:1], atol=1e-5)


def test_folding_follows_a_change_of_the_weights():
    head = trained_batchnorm_head()
    x = torch.randn(2, 16, 8, 8)
    with torch.inference_mode():
        before = head(x)
    with torch.no_grad():
        head.classifier[0].running_mean.add_(0.5)
        head.classifier[1].weight.mul_(2.0)
        head.classifier[-1].bias.add_(1.0)  # the inference path caches the last layer too
    expected = layer_by_layer(head, x)
    with torch.inference_mode():
        after = head(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, expected, atol=1e-5)


def test_training_mode_normalises_with_the_batch():
    head = trained_batchnorm_head().train()
    x = torch.randn(8, 16, 8, 8)
    assert torch.allclose(head(x), layer_by_layer(head, x), atol=1e-5)
    assert torch.allclose(head(x), head.classify(head.features(x)))


def test_layernorm_gelu_head_equals_its_layers():
    torch.manual_seed(0)
    head = ExitHead((16, 8, 8), 5, pool=4, hidden=12).eval()
    x = torch.randn(3, 16, 8, 8)
    with torch.inference_mode():
        assert torch.allclose(head(x), layer_by_layer(head, x), atol=1e-6)


@pytest.mark.parametrize("shape", [(16, 8, 8), (16, 7, 9)])
def test_pooling_matches_adaptive_pooling(shape):
    head = ExitHead(shape, 5, pool=4)
    x = torch.randn(3, *shape)
    assert head.pool_kernel == ((2, 2) if shape == (16, 8, 8) else None)
    assert torch.allclose(head.features(x), F.adaptive_avg_pool2d(x, (4, 4)).flatten(1), atol=1e-6)


@pytest.mark.parametrize("kwargs,word", [({"norm": "group"}, "norm"), ({"activation": "tanh"}, "activation")])
def test_unknown_norm_or_activation_is_named(kwargs, word):
    with pytest.raises(ValueError, match=f"unknown head {word}"):
        ExitHead((16, 8, 8), 5, **kwargs)


def test_single_sample_path_follows_a_change_of_the_weights():
    head = trained_batchnorm_head()
    x = torch.randn(1, 16, 8, 8)
    with torch.inference_mode():
        before = head.single_sample_logits(x)
        head.classifier[1].weight.mul_(2)
        after = head.single_sample_logits(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, layer_by_layer(head, x), atol=1e-5)


def test_single_sample_path_lets_hooks_and_layernorm_heads_see_the_call():
    calls = []
    layer_norm_head = ExitHead((16, 8, 8), 5, pool=4, hidden=6).eval()
    hooked = trained_batchnorm_head()
    for head in (layer_norm_head, hooked):
        head.register_forward_hook(lambda module, args, out: calls.append(module))
        with torch.inference_mode():
            head.single_sample_logits(torch.randn(1, 16, 8, 8))
    assert calls == [layer_norm_head, hooked]
