"""The DenseNet family: sizes from the paper and torchvision, weight compatibility, the
memory-efficient mode, and behaviour across every architecture (no GPU needed)."""

import json

import pytest
import torch
import torchvision

from densenet_ray import model as M

TORCHVISION_PARAMS = {"densenet121": 7_978_856, "densenet161": 28_681_000, "densenet169": 14_149_480,
                      "densenet201": 20_013_928, "densenet264": 33_337_704}
TABLE2_PARAMS_M = {"densenet40_k12": 1.0, "densenet100_k12": 7.0, "densenet100_k24": 27.2,
                   "densenet_bc100_k12": 0.8, "densenet_bc250_k24": 15.3, "densenet_bc190_k40": 25.6}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def small_input(net: M.DenseNet, batch: int = 2, seed: int = 0) -> torch.Tensor:
    # ImageNet models at 64x64 (the 32x downsampling leaves 2x2), CIFAR ones at their native 32.
    size = 64 if net.stem == "imagenet" else 32
    return torch.randn(batch, net.in_channels, size, size, generator=torch.Generator().manual_seed(seed))


def train_step_grads(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    net.train().zero_grad()
    out = net(x)
    (out * torch.linspace(-1, 1, out.shape[1], device=out.device)).sum().backward()
    return out.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in net.named_parameters()}


def assert_same_step(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor, tol: float = 1e-5) -> None:
    """Same outputs, gradients and updated BN running statistics for one training step."""
    torch.manual_seed(1)
    out_a, grads_a = train_step_grads(a, x)
    torch.manual_seed(1)
    out_b, grads_b = train_step_grads(b, x)
    assert rel_err(out_b, out_a) < tol
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert rel_err(grads_b[name], grads_a[name]) < tol, name
    for (name, sa), sb in zip(a.state_dict().items(), b.state_dict().values()):
        assert rel_err(sb, sa) < tol, name


@pytest.mark.parametrize("arch", TORCHVISION_PARAMS)
def test_imagenet_parameter_counts_are_exact(arch):
    assert M.summary(arch)["params"] == TORCHVISION_PARAMS[arch]


@pytest.mark.parametrize("arch", TABLE2_PARAMS_M)
def test_cifar_parameter_counts_match_table2(arch):
    assert round(M.summary(arch, num_classes=10)["params"] / 1e6, 1) == TABLE2_PARAMS_M[arch]


def test_densenet121_macs():
    assert 2.83 <= M.summary("densenet121")["gmacs"] <= 2.88


@pytest.mark.parametrize("arch,depth", [("densenet121", 121), ("densenet201", 201),
                                        ("densenet40_k12", 40), ("densenet_bc190_k40", 190)])
def test_depth_counts_weighted_layers(arch, depth):
    assert M.summary(arch)["depth"] == depth


@pytest.mark.parametrize("arch", ["densenet121", "densenet161", "densenet169", "densenet201"])
def test_torchvision_weights_load_both_ways_and_agree(arch):
    theirs = getattr(torchvision.models, arch)()
    ours = M.build(arch)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = small_input(ours)
    assert rel_err(ours.eval()(x), theirs.eval()(x)) < 1e-5
    assert_same_step(theirs, ours, small_input(ours, seed=3))

    fresh = getattr(torchvision.models, arch)()
    fresh.load_state_dict(M.build(arch).state_dict(), strict=True)


@pytest.mark.parametrize("arch,overrides", [
    ("densenet121", {}),
    ("densenet_bc100_k12", {}),
    ("densenet40_k12", {}),                       # no bottleneck: conv1 is the 3x3 conv
    ("densenet_bc100_k12", {"drop_rate": 0.2}),   # dropout masks replayed in the recomputation
    ("densenet_bc100_k12", {"momentum": None}),   # cumulative running averages count batches alike
])
def test_memory_efficient_matches_plain(arch, overrides):
    momentum = overrides.pop("momentum", 0.1)
    plain = M.build(arch, num_classes=10, **overrides)
    efficient = M.build(arch, num_classes=10, memory_efficient=True, **overrides)
    for norm in [*plain.modules(), *efficient.modules()]:
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.momentum = momentum
    efficient.load_state_dict(plain.state_dict())
    x = small_input(plain, batch=4)
    assert_same_step(plain, efficient, x)
    assert_same_step(plain, efficient, small_input(plain, batch=4, seed=5))  # scratch reused, stats updated twice


def test_memory_efficient_channels_last_and_frozen_batchnorm():
    plain = M.build("densenet121", num_classes=10).to(memory_format=torch.channels_last)
    efficient = M.build("densenet121", num_classes=10, memory_efficient=True).to(memory_format=torch.channels_last)
    efficient.load_state_dict(plain.state_dict())
    x = small_input(plain, batch=4).contiguous(memory_format=torch.channels_last)
    assert_same_step(plain, efficient, x)
    # Fine-tuning with frozen BatchNorm (eval-mode statistics) still gets every gradient right.
    for net in (plain, efficient):
        net.train().zero_grad()
        for norm in net.modules():
            if isinstance(norm, torch.nn.BatchNorm2d):
                norm.eval()
    out_a, out_b = plain(x), efficient(x)
    assert rel_err(out_b, out_a) < 1e-5
    out_a.sum().backward()
    out_b.sum().backward()
    for (name, a), b in zip(plain.named_parameters(), efficient.parameters()):
        assert rel_err(b.grad, a.grad) < 1e-5, name


def test_memory_efficient_saves_less_for_backward():
    # What autograd keeps between forward and backward (each storage once).
    def saved_bytes(net, x):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net.train()(x)
        return sum(storages.values())

    x = torch.randn(4, 3, 32, 32)
    plain = saved_bytes(M.build("densenet_bc100_k12", num_classes=10), x)
    efficient = saved_bytes(M.build("densenet_bc100_k12", num_classes=10, memory_efficient=True), x)
    assert efficient < 0.25 * plain


@pytest.mark.parametrize("arch", M.ARCHS)
def test_every_architecture_trains(arch):
    torch.manual_seed(0)
    net = M.build(arch, num_classes=7)
    x = small_input(net)
    out = net.train()(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} received no gradient"


@pytest.mark.parametrize("arch", ["densenet121", "densenet_bc100_k12"])
def test_grayscale_input(arch):
    net = M.build(arch, num_classes=10, in_channels=1)
    out = net.eval()(small_input(net))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_cifar_stem_and_transitions_follow_the_paper():
    bc = M.build("densenet_bc100_k12", num_classes=10)
    assert bc.features.conv0.out_channels == 24 and bc.features.conv0.kernel_size == (3, 3)  # 2k for BC
    assert len([n for n in bc.features._modules if n.startswith("denseblock")]) == 3
    assert bc.features.denseblock1.denselayer1.conv1.out_channels == 48  # bottleneck: 4k maps
    assert bc.features.transition1.conv.out_channels == (24 + 16 * 12) // 2  # theta = 0.5
    plain = M.build("densenet40_k12", num_classes=10)
    assert plain.features.conv0.out_channels == 16
    assert plain.features.transition1.conv.out_channels == 16 + 12 * 12  # theta = 1 keeps every map
    assert not hasattr(plain.features.denseblock1.denselayer1, "conv2")
    imagenet = M.build("densenet121")
    assert imagenet.features.conv0.kernel_size == (7, 7) and imagenet.features.conv0.out_channels == 64


def test_compression_and_growth_rate_overrides():
    net = M.build("densenet121", growth_rate=24, compression=0.75)
    assert net.features.conv0.out_channels == 48
    m = 48 + 6 * 24
    assert net.features.transition1.conv.out_channels == int(0.75 * m)
    assert M.build("densenet_bc", depth=40, growth_rate=12, num_classes=10).block_config == (6, 6, 6)


def test_channels_last_matches_contiguous():
    net = M.build("densenet_bc100_k12", num_classes=10)
    twin = M.build("densenet_bc100_k12", num_classes=10).to(memory_format=torch.channels_last)
    twin.load_state_dict(net.state_dict())
    x = small_input(net, batch=4)
    assert_same_step(net, twin, x.contiguous(memory_format=torch.channels_last), tol=1e-4)


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_bf16_autocast_on_cpu(memory_efficient):
    net = M.build("densenet_bc100_k12", num_classes=10, memory_efficient=memory_efficient).train()
    x = small_input(net, batch=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert out.dtype == torch.bfloat16
    out.float().logsumexp(1).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())
    reference = M.build("densenet_bc100_k12", num_classes=10)
    reference.load_state_dict(net.state_dict())
    assert rel_err(out.detach(), reference.train()(x).detach()) < 0.1  # bf16 has 8 mantissa bits


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_torch_compile_matches_eager(memory_efficient):
    eager = M.build("densenet_bc", depth=16, growth_rate=8, num_classes=10, memory_efficient=memory_efficient)
    twin = M.build("densenet_bc", depth=16, growth_rate=8, num_classes=10, memory_efficient=memory_efficient)
    twin.load_state_dict(eager.state_dict())
    assert_same_step(eager, torch.compile(twin), small_input(eager, batch=4), tol=1e-4)


@pytest.mark.parametrize("call,message", [
    (lambda: M.build("densenet_bc", depth=101, growth_rate=12), "depth=101 is not valid for a 3-block DenseNet-BC"),
    (lambda: M.build("densenet_bc99_k12"), "(L - 4) must be a positive multiple of 6"),
    (lambda: M.build("densenet41_k12"), "multiple of 3"),
    (lambda: M.build("resnet50"), "unknown architecture 'resnet50'"),
    (lambda: M.build("densenet121", compression=1.5), "compression=1.5"),
    (lambda: M.build("densenet121", depth=100), "block_config"),
    (lambda: M.build("densenet_bc"), "needs depth=L and growth_rate=k"),
])
def test_invalid_arguments_say_what_is_accepted(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_cli_prints_json(capsys):
    M.main(["densenet121", "densenet_bc100_k12", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [r["arch"] for r in rows] == ["densenet121", "densenet_bc100_k12"]
    assert rows[0]["params"] == 7_978_856 and rows[1]["input_size"] == 32
    assert 0.28 < rows[1]["gmacs"] < 0.30


def test_cli_table_lists_every_architecture(capsys):
    M.main([])
    out = capsys.readouterr().out
    assert all(arch in out for arch in M.ARCHS)
    with pytest.raises(SystemExit):
        M.main(["densenet_bc99_k12"])


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("arch", ["densenet121", "densenet_bc100_k12"])
def test_memory_efficient_matches_plain_in_float64(arch, device):
    # In float64, so that kernels that round differently cannot hide a wrong gradient: on CUDA plain
    # mode runs cuDNN's BatchNorm and the memory-efficient mode aten's, and in float32 that alone moves
    # conv0's gradient by ~3e-3 relative (on an H200; on a CPU, writing BN out by hand moves it as much).
    plain = M.build(arch, num_classes=10).to(device, torch.float64)
    efficient = M.build(arch, num_classes=10, memory_efficient=True).to(device, torch.float64)
    efficient.load_state_dict(plain.state_dict())
    assert_same_step(plain, efficient, small_input(plain, batch=8).to(device, torch.float64))


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_autocast_channels_last_and_compile_on_cuda(dtype, memory_efficient):
    torch.compiler.reset()  # compiled code from the other autocast dtype is not reused (guards miss it)
    net = M.build("densenet_bc", depth=40, growth_rate=12, num_classes=10, memory_efficient=memory_efficient)
    net = net.cuda().to(memory_format=torch.channels_last).train()
    reference = M.build("densenet_bc", depth=40, growth_rate=12, num_classes=10).cuda()
    reference.load_state_dict(net.state_dict())
    x = small_input(net, batch=8).cuda().contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(net)
    for model in (net, compiled):
        with torch.autocast("cuda", dtype=dtype):
            out = model(x)
        assert out.dtype == dtype
        out.float().logsumexp(1).sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
                   for p in net.parameters())
        assert rel_err(out.detach(), reference.train()(x).detach()) < 0.1
