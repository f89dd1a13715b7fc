"""Presets, command-line overrides and the learning-rate schedule (no Ray needed)."""

import re

import pytest

from densenet_ray import config as C
from densenet_ray.model import from_config


def test_paper_recipes():
    imagenet, c10, svhn = C.PRESETS["imagenet"], C.PRESETS["cifar10"], C.PRESETS["svhn"]
    assert (imagenet.arch, imagenet.epochs, imagenet.batch_size, imagenet.lr) == ("densenet121", 90, 256, 0.1)
    assert [imagenet.lr_at(e) for e in (0, 29.9, 30, 59.9, 60, 89)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3])
    assert (c10.epochs, c10.batch_size, c10.train_transform) == (300, 64, "cifar_train")
    assert [c10.lr_at(e) for e in (149, 150, 225)] == pytest.approx([0.1, 0.01, 1e-3])
    assert C.PRESETS["cifar100_noaug"].drop_rate == 0.2 and C.PRESETS["cifar100_noaug"].train_transform == "none"
    assert (svhn.epochs, svhn.drop_rate, svhn.train_transform, svhn.train_split) == (40, 0.2, "none", "train+extra")
    for cfg in C.PRESETS.values():
        assert (cfg.momentum, cfg.weight_decay) == (0.9, 1e-4)
    # ImageNet streams row groups through a buffer; the small splits get a full permutation every epoch
    assert (imagenet.shuffle, imagenet.shuffle_buffer) == ("row_groups", 2048) and C.TrainConfig() == imagenet
    assert {(c.shuffle, c.shuffle_buffer) for n, c in C.PRESETS.items() if n != "imagenet"} == {("rows", 0)}


# The depth L (Table 1/2) and growth rate k each preset builds.
PRESET_ARCH = {"imagenet": (121, 32), "cifar10": (100, 12), "cifar100": (100, 12), "cifar10_noaug": (100, 12),
               "cifar100_noaug": (100, 12), "svhn": (100, 12), "digits": (22, 12)}


@pytest.mark.parametrize("preset", list(C.PRESETS))
def test_every_preset_resolves_and_builds(preset):
    cfg = C.from_args([preset])
    assert cfg.run_name.startswith(preset) and cfg.registered_model is None  # the driver names it after the data
    classes, channels = C.DATASETS[cfg.dataset]
    net = from_config(cfg, classes, channels)
    assert (net.depth, net.growth_rate, net.in_channels, net.classifier.out_features) == (
        *PRESET_ARCH[preset], channels, classes)


@pytest.mark.parametrize("asked, gpu, bf16, resolved", [
    (("auto", None), False, False, ("fp32", False)),    # CPU workers
    (("auto", None), True, True, ("bf16", True)),       # Ampere and later
    (("auto", None), True, False, ("fp16", True)),      # V100, T4: fp16 with the gradient scaler
    (("fp32", None), True, True, ("fp32", False)),      # what is asked stays asked
    (("bf16", False), True, True, ("bf16", False)),
    (("auto", True), False, False, ("fp32", True)),
])
def test_precision_auto_resolves_for_the_workers_device(asked, gpu, bf16, resolved):
    cfg = C.PRESETS["imagenet"].replace(precision=asked[0], channels_last=asked[1])
    assert C.PRESETS["imagenet"].precision == "auto" and C.PRESETS["imagenet"].channels_last is None
    out = cfg.for_device(gpu, bf16)
    assert (out.precision, out.channels_last) == resolved
    out.replace(run_name="r").validate()


@pytest.mark.parametrize("name, text, value, typed", [
    ("epochs", "12", 12, 12), ("lr", "0.05", 0.05, 0.05), ("channels_last", "true", True, True),
    ("lr_milestones", "0.5,0.75", (0.5, 0.75), [0.5, 0.75]), ("image_size", "none", None, None),
])
def test_flags_and_yaml_values_follow_one_typing_rule(name, text, value, typed):
    assert C.coerce(name, text) == value == C.coerce(name, typed)
    assert C.from_args(["digits", f"--{name.replace('_', '-')}", text, "--run-name", "r"]).replace(
        run_name="r") == C.PRESETS["digits"].replace(**{name: value}).resolved().replace(run_name="r")


@pytest.mark.parametrize("name, value, message", [
    ("epochs", "three", "'three' is not an integer"), ("epochs", 2.5, "2.5 is not an integer"),
    ("epochs", True, "True is not an integer"), ("lr", "inf", "not a finite number"),
    ("bottleneck", "maybe", "is not a boolean"), ("arch", 121, "is not text"),
    ("epoch", 3, "unknown field 'epoch' (did you mean 'epochs'?)"),
])
def test_coerce_refuses_with_the_reason(name, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        C.coerce(name, value)


def test_linear_scaling_and_warmup_past_the_recipe_batch():
    cfg = C.PRESETS["imagenet"].replace(batch_size=1024)
    assert cfg.lr_scaled == pytest.approx(0.4)
    assert cfg.lr_at(0) == pytest.approx(0.1)          # warm-up starts at the recipe's lr
    assert cfg.lr_at(2.5) == pytest.approx(0.25)
    assert cfg.lr_at(5) == pytest.approx(0.4)
    assert cfg.lr_at(30) == pytest.approx(0.04)
    small = C.PRESETS["imagenet"].replace(batch_size=128)
    assert small.warmup == 0 and small.lr_at(0) == pytest.approx(0.05)


def test_overrides_are_typed():
    cfg = C.from_args(["cifar10", "--epochs", "3", "--growth-rate", "24", "--depth", "40", "--bottleneck", "false",
                       "--compression", "1", "--lr-milestones", "0.5,0.9", "--channels-last", "--precision", "bf16",
                       "--run-name", "r1", "--image-size", "none"])
    assert (cfg.epochs, cfg.growth_rate, cfg.depth, cfg.bottleneck, cfg.compression) == (3, 24, 40, False, 1.0)
    assert cfg.lr_milestones == (0.5, 0.9) and cfg.channels_last is True and cfg.image_size is None
    net = from_config(cfg, 10, 3)
    assert net.depth == 40 and not net.bottleneck and net.growth_rate == 24


def test_config_round_trips_through_a_dict():
    cfg = C.from_args(["svhn", "--run-name", "x"])
    assert C.from_dict(C.to_dict(cfg)) == cfg


@pytest.mark.parametrize("argv,message", [
    (["imagenett"], "unknown preset 'imagenett'; choose one of imagenet"),
    (["digits", "--epoch", "3"], "did you mean --epoch -> --epochs"),
    (["digits", "--epochs", "three"], "'three' is not an integer"),
    (["digits", "--batch-size", "63"], "--batch-size 63: expected a positive multiple of --workers (2)"),
    (["digits", "--precision", "fp8"], "--precision 'fp8': expected auto or fp32 or bf16 or fp16"),
    (["digits", "--compression", "1.5"], "--compression 1.5: expected theta in (0, 1]"),
    (["digits", "--channels-last", "maybe"], "'maybe' is not a boolean"),
    (["digits", "--lr-milestones", "50,75"], "fractions of the epochs"),
])
def test_bad_flags_say_what_is_accepted(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        C.from_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_every_field_with_the_preset_default(capsys):
    with pytest.raises(SystemExit):
        C.from_args(["cifar10", "--help"])
    out = capsys.readouterr().out
    for name in C.to_dict(C.PRESETS["cifar10"]):
        if name != "preset":
            assert f"--{name.replace('_', '-')}" in out
    assert "densenet_bc100_k12" in out  # the preset's value, not the base default


@pytest.mark.parametrize("argv", [["--workers", "4", "cifar10"], ["--channels-last", "cifar10"],
                                  ["--channels-last", "true", "cifar10", "--workers", "4"],
                                  ["cifar10", "--workers=4", "--channels-last"]])
def test_the_preset_may_stand_anywhere_among_the_flags(argv):
    cfg = C.from_args(argv)
    assert cfg.preset == "cifar10" and cfg.arch == "densenet_bc100_k12"
    assert cfg.workers == (4 if any("4" in a for a in argv) else 2)
    assert cfg.channels_last == (True if "--channels-last" in argv else None)   # None: the device decides


def test_a_flag_value_is_not_taken_for_the_preset():
    cfg = C.from_args(["--run-name", "imagenet", "cifar10"])
    assert (cfg.preset, cfg.run_name) == ("cifar10", "imagenet")


def test_no_preset_validates_or_selects_on_the_test_split(capsys):
    for name, cfg in C.PRESETS.items():
        assert cfg.val_split != "test" and "test" not in (cfg.train_split or "").split("+"), name
    assert (C.PRESETS["cifar10"].val_split, C.PRESETS["cifar10"].test_split) == ("val", "test")
    assert (C.PRESETS["svhn"].select, C.PRESETS["svhn"].val_split, C.PRESETS["svhn"].test_split) == ("best", "val", "test")
    assert C.PRESETS["svhn"].normalize == "unit" and C.PRESETS["cifar10"].normalize == "mean_std"  # SVHN: / 255
    with pytest.raises(SystemExit):
        C.from_args(["cifar10", "--help"])
    out = capsys.readouterr().out
    assert "--val-split" in out and "--test-split" in out and "--select" in out


def test_the_final_protocol_trains_on_train_and_val_without_validation():
    cfg = C.from_args(["cifar10", "--train-split", "train+val", "--val-split", "none"])
    assert (cfg.train_split, cfg.val_split, cfg.test_split, cfg.select) == ("train+val", None, "test", "last")


@pytest.mark.parametrize("argv, message", [
    (["svhn", "--val-split", "none"], "--select 'best': expected last when there is no --val-split"),
    (["cifar10", "--test-split", "val"], "--test-split 'val': expected a split of its own"),
    (["cifar10", "--sync-bn"], "--sync-bn True: expected false on CPU workers"),
    (["cifar10", "--shuffle", "blocks"], "--shuffle 'blocks': expected rows or row_groups"),
])
def test_protocol_flags_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit):
        C.from_args(argv)
    assert message in capsys.readouterr().err


def test_small_per_worker_batches_are_warned_about():
    from densenet_ray import train

    assert train.small_batch_warning(C.PRESETS["imagenet"].replace(workers=8)) is None  # 32 a worker
    warning = train.small_batch_warning(C.PRESETS["imagenet"].replace(workers=32))
    assert "leaves 8 images per worker" in warning and "--sync-bn" in warning
    assert train.small_batch_warning(C.PRESETS["imagenet"].replace(workers=32, sync_bn=True, gpus_per_worker=1)) is None


def test_svhn_inputs_are_pixels_over_255_as_in_the_paper():
    from densenet_ray import train
    from densenet_ray.data import Manifest

    m = Manifest(root="/d", name="svhn", classes=("0", "1"), wnids=("0", "1"), channels=3, mean=(0.4, 0.4, 0.4),
                 std=(0.2, 0.2, 0.2), splits={})
    assert train.input_stats(C.PRESETS["svhn"], m) == ([0.0] * 3, [1.0] * 3)
    assert train.input_stats(C.PRESETS["cifar10"], m) == ([0.4] * 3, [0.2] * 3)
