"""The per-worker loop's pieces without Ray: train_one_epoch, evaluate, the epoch metrics and the
resumability check, driven by an in-memory stand-in for a Ray Data shard (seconds)."""

import math

import pytest
import torch
import torch.nn.functional as F

from densenet_ray import config as C
from densenet_ray.model import from_config
from densenet_ray.loop import (COUNTS, Prepare, better, check_resumable, epoch_metrics, evaluate, held_out_metrics,
                               restore, select, summed, train_one_epoch)

CPU = torch.device("cpu")
CFG = C.PRESETS["digits"].replace(workers=1, batch_size=16, epochs=4, run_name="loop", shuffle_buffer=0)
MEAN, STD = (0.5,), (0.25,)


class Shard:
    """What the loop asks of ray.train.get_dataset_shard(...): iter_torch_batches, uint8 NHWC images."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels, self.calls = images, labels, []

    def iter_torch_batches(self, *, batch_size, drop_last=False, **options):
        self.calls.append({"batch_size": batch_size, "drop_last": drop_last, **options})
        stop = len(self.labels) - (len(self.labels) % batch_size if drop_last else 0)
        for i in range(0, stop, batch_size):
            yield {"image": self.images[i:i + batch_size], "label": self.labels[i:i + batch_size]}


def bright_or_dark(n: int, seed: int = 0) -> Shard:
    """Two classes a DenseNet learns in a few steps: dark (0) and bright (1) 16x16 grayscale images."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    base = torch.where(labels[:, None, None, None] == 1, 190.0, 60.0)
    images = (base + torch.randn(n, 16, 16, 1, generator=g) * 20).clamp(0, 255).to(torch.uint8)
    return Shard(images, labels)


def setup(seed: int = 0):
    torch.manual_seed(seed)
    net = from_config(CFG, 2, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=CFG.lr_at(0), momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return net, optimizer, scaler, Prepare(MEAN, STD, False, CPU)


def test_prepare_normalises_uint8_nhwc_to_float_nchw():
    images = torch.tensor([[[[0], [255]], [[128], [64]]]], dtype=torch.uint8)  # 1x2x2x1
    x = Prepare(MEAN, STD, False, CPU)(images)
    assert x.shape == (1, 1, 2, 2) and x.is_contiguous()
    torch.testing.assert_close(x, (images.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25)
    rgb = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    assert Prepare((0.5,) * 3, (0.25,) * 3, True, CPU)(rgb).is_contiguous(memory_format=torch.channels_last)


def test_train_one_epoch_counts_full_batches_follows_the_schedule_and_learns():
    net, optimizer, scaler, prepare = setup()
    shard = bright_or_dark(150)  # 9 full batches of 16, 6 left over
    losses = []
    for epoch in range(CFG.epochs):
        counts, wait, example = train_one_epoch(net, optimizer, scaler, shard, prepare, CFG, epoch, 9, CPU)
        assert set(counts) == set(COUNTS) and counts["images"].item() == 144
        assert 0 <= counts["top5"].item() <= 144 and counts["top1"].item() <= counts["top5"].item()
        assert wait >= 0 and example.shape == (2, 1, 16, 16)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(CFG.lr_at(epoch + 8 / 9))
        losses.append(counts["loss"].item() / 144)
    assert shard.calls[0]["drop_last"] is True and shard.calls[0]["batch_size"] == 16
    assert losses[-1] < losses[0] / 3, losses  # it learns: the mean training loss falls


def test_evaluate_counts_every_image_once_and_matches_a_plain_computation():
    net, _, _, prepare = setup()
    net.train()(prepare(bright_or_dark(64, seed=1).images))  # BatchNorm statistics away from 0 and 1
    shard = bright_or_dark(37, seed=2)  # two batches and a partial one: none dropped
    counts, example = evaluate(net, shard, prepare, CPU, 16)
    with torch.no_grad():
        logits = net.eval()(prepare(shard.images))
    assert counts["images"].item() == 37
    assert counts["loss"].item() == pytest.approx(F.cross_entropy(logits, shard.labels, reduction="sum").item(),
                                                   rel=1e-5)
    assert counts["top1"].item() == (logits.argmax(1) == shard.labels).sum().item()
    assert counts["top5"].item() == 37  # two classes: the label is always among the top 2
    torch.testing.assert_close(example, prepare(shard.images[:2]))
    empty, none = evaluate(net, Shard(shard.images[:0], shard.labels[:0]), prepare, CPU, 16)
    assert none is None and all(v.item() == 0 for v in empty.values())


def test_epoch_metrics_are_exact_means_of_the_summed_counts():
    sums = summed({"train_loss": 50.0, "train_top1": 30, "train_top5": 45, "train_images": 50,
                   "val_loss": torch.tensor(8.0, dtype=torch.float64), "val_top1": 15, "val_top5": 19,
                   "val_images": 20, "data_wait_s": 3.0, "train_s": 10.0}, CPU)
    m = epoch_metrics(sums, world=2, epoch=4, lr=0.01, epoch_s=12.0)
    assert m == pytest.approx({"epoch": 4, "train_loss": 1.0, "train_top1_err": 0.4, "train_top5_err": 0.1,
                               "val_loss": 0.4, "val_top1_err": 0.25, "val_top5_err": 0.05, "lr": 0.01,
                               "images_per_s": 10.0, "images_per_s_per_worker": 5.0, "data_wait_s": 1.5, "epoch_s": 12.0, "train_images": 50,
                               "val_images": 20})
    with pytest.raises(RuntimeError, match="epoch 4: no validation images reached the workers"):
        epoch_metrics({**sums, "val_images": 0.0}, 2, 4, 0.01, 1.0)
    assert not any(math.isnan(v) for v in m.values())


def test_a_checkpoint_of_another_model_or_dataset_is_not_resumed():
    state = {"config": C.to_dict(CFG), "classes": ["0", "1"]}
    check_resumable(state, CFG, {"classes": ["0", "1"]})
    with pytest.raises(ValueError, match="trained with growth_rate=None, this run asks for 24"):
        check_resumable(state, CFG.replace(growth_rate=24), {"classes": ["0", "1"]})
    with pytest.raises(ValueError, match="trained on 2 other classes than the 3 of"):
        check_resumable(state, CFG, {"classes": ["0", "1", "2"]})


def test_evaluation_is_fp32_whatever_the_training_precision():
    """What training logs is what `evaluate` (fp32) computes: validation does not run under autocast."""
    net, _, _, prepare = setup()
    net.train()(prepare(bright_or_dark(64, seed=1).images))
    shard = bright_or_dark(40, seed=3)
    fp32, _ = evaluate(net, shard, prepare, CPU, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as train_loop runs under --precision bf16
        bf16, _ = evaluate(net, shard, prepare, CPU, 16)
    assert {k: v.item() for k, v in bf16.items()} == {k: v.item() for k, v in fp32.items()}


def test_epoch_metrics_without_validation_and_held_out_test_metrics():
    m = epoch_metrics({"train_loss": 10.0, "train_top1": 6, "train_top5": 9, "train_images": 10,
                       "data_wait_s": 0.0, "train_s": 1.0}, 1, 0, 0.1, 1.0)
    assert not any(k.startswith("val_") for k in m) and m["train_top1_err"] == pytest.approx(0.4)
    assert held_out_metrics({"loss": 2.0, "top1": 3, "top5": 4, "images": 4}, "test") == pytest.approx(
        {"test_loss": 0.5, "test_top1_err": 0.25, "test_top5_err": 0.0, "test_images": 4})


def test_select_best_registers_the_epoch_with_the_lowest_validation_error():
    net, _, _, _ = setup()
    history, best = [], None
    weights = {}
    for epoch, err in enumerate([0.5, 0.2, 0.3]):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01)
        weights[epoch] = {k: v.clone() for k, v in net.state_dict().items()}
        history.append({"epoch": epoch, "val_top1_err": err})
        best = better(best, history[-1], net)
    assert best["epoch"] == 1
    assert select(CFG, history, best, net)["epoch"] == 2  # --select last: the weights stay
    assert select(CFG.replace(select="best"), history, best, net)["epoch"] == 1
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, weights[1][k])


def test_resuming_in_another_precision_starts_a_fresh_gradient_scaler():
    net, optimizer, _, _ = setup()
    fp16 = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "scaler": fp16.state_dict(),
             "config": C.to_dict(CFG.replace(precision="fp16"))}
    fresh = torch.amp.GradScaler("cpu", enabled=False)
    restore(state, CFG.replace(precision="fp32"), net, optimizer, fresh)   # today: a crash in load_state_dict
    assert not fresh.is_enabled()
    same = torch.amp.GradScaler("cpu", enabled=True)
    restore(state, CFG.replace(precision="fp16"), net, optimizer, same)
    assert same.get_scale() == 1024.0
