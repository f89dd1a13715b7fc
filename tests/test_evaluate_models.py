"""What a MODEL argument resolves to, and what is refused: checkpoints found from a run folder, an
epoch folder or state.pt; wrong arguments named with what is accepted; data that does not fit the
model; and models that need pickle, refused unless trusted, without running the planted code."""

import contextlib
import os
import shutil

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from densenet_ray import checkpoint, evaluate, trained
from densenet_ray.config import PRESETS, to_dict
from densenet_ray.data import Manifest
from densenet_ray.model import build
from densenet_ray.tracking.uri import TrackingError


def touch_and_build(marker: str) -> nn.Module:
    open(marker, "w").close()
    return nn.Linear(2, 2)


class Planted(nn.Module):
    """Unpickling it writes the file `marker`: what a hostile pickle could do, made harmless and visible."""

    def __init__(self, marker):
        super().__init__()
        self.marker = str(marker)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(x)

    def __reduce__(self):
        return (touch_and_build, (self.marker,))


def digits_net(seed: int):
    torch.manual_seed(seed)
    cfg = PRESETS["digits"]
    net = build(cfg.arch, num_classes=10, in_channels=1, **cfg.model_overrides())
    net.train()(torch.randn(16, 1, 16, 16))  # BatchNorm statistics off 0 and 1
    return net.eval()


def write_checkpoint(folder, state_of_model, *, epoch=0, cfg=None, **extra):
    """A checkpoint as training writes it: STORAGE/RUN/epoch_NNNN/state.pt."""
    cfg = cfg or PRESETS["digits"].replace(run_name="tiny", data="/nowhere")
    where = folder / checkpoint.folder_name(epoch)
    where.mkdir(parents=True)
    checkpoint.save({"model": state_of_model, "optimizer": {}, "scaler": {}, "epoch": epoch,
                     "history": [{"epoch": epoch, "val_top1_err": 0.25, "val_top5_err": 0.05}], "config": to_dict(cfg),
                     "classes": [str(i) for i in range(10)], "run_id": None, "rng": {}, **extra}, str(where))
    return where / checkpoint.STATE_FILE


def test_a_run_folder_means_its_newest_epoch(tmp_path):
    nets = {epoch: digits_net(seed=epoch) for epoch in (0, 1)}
    for epoch, net in nets.items():
        write_checkpoint(tmp_path / "tiny", net.state_dict(), epoch=epoch)
    x = torch.randn(3, 1, 16, 16)
    for source, epoch in [(tmp_path / "tiny", 1), (tmp_path / "tiny" / "epoch_0000", 0),
                          (tmp_path / "tiny" / "epoch_0000" / "state.pt", 0)]:
        m = trained.load(str(source))
        assert m.name == f"checkpoint tiny epoch {epoch + 1}"
        with torch.no_grad():
            torch.testing.assert_close(m.net(x), nets[epoch](x), atol=0, rtol=0)
    assert (m.classes, m.channels, m.num_classes, m.image_size, m.logged) == (
        [str(i) for i in range(10)], 1, 10, 16, {"val_top1_err": 0.25, "val_top5_err": 0.05})


@pytest.mark.parametrize("source, message", [
    ("models:/only-a-name", "expected models:/NAME@ALIAS"),
    ("/no/such/place", "no such file or folder"),
    ("EMPTY_FOLDER", "a folder without state.pt"),
    ("NOT_A_CHECKPOINT", "not a densenet_ray checkpoint"),
    ("OTHER_ARCH", "do not fit the architecture in its config"),
])
def test_wrong_models_are_named_with_what_is_accepted(tmp_path, source, message):
    (tmp_path / "empty").mkdir()
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    other = build("densenet_bc", depth=40, growth_rate=12, num_classes=10, in_channels=1).state_dict()
    write_checkpoint(tmp_path / "arch", other)  # config says densenet_bc22_k12
    source = {"EMPTY_FOLDER": tmp_path / "empty", "NOT_A_CHECKPOINT": tmp_path / "other.pt",
              "OTHER_ARCH": tmp_path / "arch"}.get(source, source)
    with pytest.raises(trained.ModelError, match=message):
        trained.load(str(source))


def test_checkpoint_that_needs_pickle_is_refused_and_its_code_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    write_checkpoint(tmp_path / "evil", Planted(marker))
    with pytest.raises(trained.ModelError, match="needs pickle.*--trust-pickle"):
        trained.load(str(tmp_path / "evil"))
    assert evaluate.main([str(tmp_path / "evil"), str(tmp_path), "--no-log"]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert not marker.exists()
    with pytest.raises(trained.ModelError):  # trusted: it unpickles (the plant is live), then is no DenseNet
        trained.load(str(tmp_path / "evil"), trust_pickle=True)
    assert marker.exists()


def test_registered_model_that_needs_pickle_is_refused_and_its_code_never_runs(tmp_path):
    marker, uri = tmp_path / "pwned", f"sqlite:///{tmp_path}/mlflow.db"
    with contextlib.chdir(tmp_path):  # the Default experiment keeps its artifacts in ./mlruns
        mlflow.set_tracking_uri(uri)
        try:
            with mlflow.start_run():
                mlflow.pytorch.log_model(Planted(marker), name="model", serialization_format="pickle",
                                         registered_model_name="planted", pip_requirements=["torch"])
        finally:
            mlflow.set_tracking_uri(None)
        assert MlflowClient(uri).get_model_version("planted", "1")
        with pytest.raises(TrackingError, match="needs pickle.*--trust-pickle"):
            trained.load("models:/planted/1", tracking_uri=uri)
        assert not marker.exists()
        with pytest.raises(trained.ModelError):
            trained.load("models:/planted/1", tracking_uri=uri, trust_pickle=True)
        assert marker.exists()
    shutil.rmtree(tmp_path / "mlruns", ignore_errors=True)


def manifest(**changes) -> Manifest:
    values = dict(root="/data/digits", name="digits", classes=tuple(str(i) for i in range(10)),
                  wnids=tuple(str(i) for i in range(10)), channels=1, mean=(0.3,), std=(0.4,), splits={})
    return Manifest(**{**values, **changes})


@pytest.mark.parametrize("changes, message", [
    (dict(channels=3, mean=(0.3,) * 3, std=(0.4,) * 3), "field channels is 3.*takes 1-channel"),
    (dict(classes=tuple("abcdefghijk"), wnids=tuple("abcdefghijk")), "lists 11 classes.*predicts 10"),
    (dict(classes=("zero",) + tuple(str(i) for i in range(1, 10))), r"classes\[0\] is 'zero'.*label 0 .* is '0'"),
])
def test_data_the_model_was_not_trained_for_is_an_error(tmp_path, changes, message):
    write_checkpoint(tmp_path / "tiny", digits_net(0).state_dict())
    model = trained.load(str(tmp_path / "tiny"))
    trained.check_compatible(model, manifest())
    with pytest.raises(trained.ModelError, match=message):
        trained.check_compatible(model, manifest(**changes))


def test_normalisation_is_the_training_datas_else_says_what_to_pass(tmp_path, capsys):
    write_checkpoint(tmp_path / "tiny", digits_net(0).state_dict())  # its config's data: /nowhere
    model = trained.load(str(tmp_path / "tiny"))
    with pytest.raises(trained.ModelError, match="/nowhere .*--stats DATASET"):
        trained.normalization(model)
    mean, std, where = trained.normalization(model, fallback=manifest())
    assert (mean, std) == ((0.3,), (0.4,)) and "not readable" in where
    assert "warning: checkpoint tiny epoch 1 carries no mean/std" in capsys.readouterr().err
    with pytest.raises(trained.ModelError, match="--stats .* 3-channel"):
        trained.normalization(model, given=manifest(channels=3, mean=(0.3,) * 3, std=(0.4,) * 3))
    assert os.path.exists(tmp_path / "tiny")


def test_results_of_a_model_whose_run_is_elsewhere_go_to_a_new_run(tmp_path):
    write_checkpoint(tmp_path / "tiny", digits_net(0).state_dict(), run_id="0123456789abcdef")  # another store's
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    model = trained.load(str(tmp_path / "tiny"), tracking_uri=uri)
    (tmp_path / "note.json").write_text("{}")
    run_id = trained.record(model, metrics={"eval_val_top1_err": 0.5}, tags={"eval_val_data": "/d"},
                           artifacts=[str(tmp_path / "note.json")], artifact_dir="analysis")
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert (run.info.run_name, run.info.status) == ("eval-tiny", "FINISHED")
    assert run.data.metrics == {"eval_val_top1_err": 0.5}
    assert run.data.tags["densenet_ray.model"] == str(tmp_path / "tiny") and run.data.tags["eval_val_data"] == "/d"
    assert [a.path for a in client.list_artifacts(run_id, "analysis")] == ["analysis/note.json"]
    assert client.get_experiment(run.info.experiment_id).name == "densenet_ray"


def test_normalisation_recorded_with_the_weights_wins_over_the_evaluated_data(tmp_path, capsys):
    write_checkpoint(tmp_path / "tiny", digits_net(0).state_dict(), mean=[0.2], std=[0.3])  # as training writes
    model = trained.load(str(tmp_path / "tiny"))
    mean, std, where = trained.normalization(model, fallback=manifest())
    assert (mean, std) == ((0.2,), (0.3,)) and "recorded with the model" in where
    assert capsys.readouterr().err == ""
