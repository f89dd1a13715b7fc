"""Figure 5's feature-reuse heat map: one (L+1) x (L+1) matrix per dense block, whose entries are the
mean absolute weights of each target's first conv over the channels each source contributed."""

import numpy as np
import pytest
import torch
from PIL import Image

from densenet_ray.analyze import feature_reuse, plot
from densenet_ray.model import build

# Bottleneck (conv1 is the 1x1), plain DenseNet (conv1 is the 3x3), and an ImageNet stem with 4 blocks.
ARCHS = {
    "densenet_bc": dict(arch="densenet_bc", depth=22, growth_rate=4, num_classes=3, in_channels=1),
    "densenet": dict(arch="densenet", depth=13, growth_rate=4, num_classes=5),
    "densenet121": dict(arch="densenet121", growth_rate=4, block_config=(2, 3, 4, 2), num_classes=7),
}


def net_of(name):
    kwargs = dict(ARCHS[name])
    torch.manual_seed(0)
    return build(kwargs.pop("arch"), **kwargs)


def plant(net):
    """Make |w| = s + 1 on the input channels source s contributed, in every target of every block."""
    blocks = dict(net.features.named_children())
    for b, layers in enumerate(net.block_config, start=1):
        block = blocks[f"denseblock{b}"]
        first = block["denselayer1"].conv1.in_channels
        after = blocks[f"transition{b}"].conv if f"transition{b}" in blocks else net.classifier
        for target in [block[f"denselayer{l}"].conv1 for l in range(1, layers + 1)] + [after]:
            w = target.weight.data
            sign = torch.where(torch.rand_like(w) < 0.5, -1.0, 1.0)
            sources = torch.zeros(w.shape[1])
            sources[first:] = 1 + torch.arange(w.shape[1] - first) // net.growth_rate
            w.copy_(sign * (sources + 1).view(1, -1, *([1] * (w.dim() - 2))))


@pytest.mark.parametrize("name", ARCHS)
def test_one_square_matrix_per_block_with_the_blocks_layer_counts(name):
    net = net_of(name)
    blocks = feature_reuse(net)
    assert [m.shape for m in blocks] == [(n + 1, n + 1) for n in net.block_config]
    for m in blocks:
        n = m.shape[0]
        # target l (column l - 1) reads sources 0..l-1; the transition/classifier column all of them
        readable = np.array([[s < min(col + 1, n) for col in range(n)] for s in range(n)])
        assert np.array_equal(~np.isnan(m), readable)
        assert np.nanmax(m, axis=0) == pytest.approx(np.ones(n))  # each column divided by its maximum
        assert np.nanmin(m) > 0


@pytest.mark.parametrize("name", ARCHS)
def test_values_are_the_mean_absolute_weight_of_each_sources_channels(name):
    net = net_of(name)
    plant(net)
    for m in feature_reuse(net):
        n = m.shape[0]
        for col in range(n):
            sources = min(col + 1, n)
            expected = np.arange(1, sources + 1) / sources  # |w| = s + 1, over the column's maximum
            np.testing.assert_allclose(m[:sources, col], expected, rtol=1e-6)


def test_heat_map_png_is_written_and_not_blank(tmp_path):
    net = net_of("densenet_bc")
    plant(net)
    path = tmp_path / "fig5.png"
    plot(feature_reuse(net), "planted", str(path))
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[1] > img.shape[0] > 300  # three panels side by side
    colours = {tuple(p) for p in img.reshape(-1, 3)[::7]}
    assert len(colours) > 50  # a colour scale, not an empty canvas
