"""The model registry against a real SQLite store: aliases, a model that loads back exactly and
without unpickling anything, and models that need pickle refused unless trusted."""

import contextlib
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from densenet_ray.tracking import registry
from densenet_ray.tracking.registry import load_registered_model, log_and_register
from densenet_ray.tracking.runlog import RunLogger
from densenet_ray.tracking.uri import TrackingError, resolve_tracking_uri

_globals_unpickled: list | None = None


def _audit(event, args):
    if event == "pickle.find_class" and _globals_unpickled is not None:
        _globals_unpickled.append(args)


# Python's unpickler reports every global it imports (what makes pickle run code) to audit
# hooks; torch.load(weights_only=True) uses its own restricted unpickler and reports none.
# A hook cannot be removed: this one only records inside unpickled_globals().
sys.addaudithook(_audit)


@contextlib.contextmanager
def unpickled_globals():
    global _globals_unpickled
    _globals_unpickled = []
    try:
        yield _globals_unpickled
    finally:
        _globals_unpickled = None


def tiny_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    model(torch.randn(8, 3, 16, 16))  # train mode: BatchNorm running statistics move off 0 / 1
    return model


def tiny_densenet(seed: int) -> nn.Module:
    build = pytest.importorskip("densenet_ray.model").build
    torch.manual_seed(seed)
    model = build("densenet40_k12", num_classes=10, depth=10, growth_rate=4,
                  memory_efficient=True)
    model(torch.randn(8, 3, 16, 16))
    return model


def images(n: int, seed: int = 0) -> np.ndarray:
    """Normalised float32 NCHW images."""
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16), dtype=np.float32)


def run_home(run) -> Path:
    return Path(run.uri.removeprefix("sqlite:///")).parent


@pytest.fixture
def run(home):
    """A run in a fresh embedded store (MLFLOW_TRACKING_URI unset)."""
    logger = RunLogger.start(resolve_tracking_uri(None), "registry", "run", params={})
    yield logger
    logger.finish()


def test_candidate_is_the_newest_and_champion_the_best(run):
    client = MlflowClient(run.uri)
    models = {}
    for seed, err, candidate, champion in [(1, 0.30, 1, 1), (2, 0.40, 2, 1), (3, 0.20, 3, 3)]:
        models[seed] = tiny_cnn(seed)
        version = log_and_register(run.uri, run.run_id, models[seed], registered_name="cnn",
                                             input_example=images(2), val_top1_err=err,
                                             extra={"arch": "tiny"})
        assert version == seed
        aliases = client.get_registered_model("cnn").aliases
        assert (aliases["candidate"], aliases["champion"]) == (candidate, champion)
    tags = client.get_model_version("cnn", "2").tags
    assert (tags["val_top1_err"], tags["arch"]) == ("0.4", "tiny")

    loaded = load_registered_model("models:/cnn@champion")
    x = torch.from_numpy(images(5, seed=7))  # another batch size than the example's 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), models[3].eval()(x), atol=1e-5, rtol=0)
        assert not torch.allclose(loaded(x), models[1](x), atol=1e-3)


@pytest.mark.parametrize("make_model", [tiny_cnn, tiny_densenet])
def test_registered_model_loads_without_unpickling(run, make_model):
    model = make_model(0)
    log_and_register(run.uri, run.run_id, model, registered_name="safe", input_example=images(1),
                               val_top1_err=0.5)
    source = MlflowClient(run.uri).get_model_version("safe", "1").source  # models:/m-...
    folder = run_home(run) / "artifacts" / "models" / source.removeprefix("models:/") / "artifacts"
    assert sorted(p.name for p in (folder / "data").iterdir()) == ["model.pt2"]
    signature = mlflow.models.Model.load(folder / "MLmodel").signature
    assert signature.inputs.to_dict() == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 3, 16, 16)}}]
    with unpickled_globals() as unpickled:
        loaded = load_registered_model("models:/safe/1")
    assert unpickled == []
    x = torch.from_numpy(images(3, seed=1))  # the example had one image, doubled to keep N free
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), atol=1e-5, rtol=0)


def test_model_that_needs_pickle_is_refused_unless_trusted(run):
    # Someone else's model, logged with MLflow's pickle flavour.
    model = tiny_cnn(0).eval()
    mlflow.set_tracking_uri(run.uri)
    try:
        mlflow.pytorch.log_model(model, name="model", run_id=run.run_id,
                                 serialization_format="pickle", registered_model_name="pickled",
                                 pip_requirements=["torch"])
    finally:
        mlflow.set_tracking_uri(None)
    with pytest.raises(TrackingError, match="--trust-pickle"):
        load_registered_model("models:/pickled/1", tracking_uri=run.uri)
    with unpickled_globals() as unpickled:
        loaded = load_registered_model("models:/pickled/1", tracking_uri=run.uri,
                                       trust_pickle=True)
    assert any(module.startswith("torch.nn") for module, _ in unpickled)  # the hook works
    x = torch.from_numpy(images(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("example", [images(2).astype(np.float64), images(2)[0]])
def test_input_example_must_be_float32_images(run, example):
    with pytest.raises(ValueError, match=r"float32 array of shape \(N, C, H, W\)"):
        log_and_register(run.uri, run.run_id, tiny_cnn(0), registered_name="bad", input_example=example,
                                   val_top1_err=0.5)


def test_champion_moves_only_between_versions_evaluated_on_the_same_data(run):
    client = MlflowClient(run.uri)
    cifar = registry.Evaluated("cifar10", "aaaa", "val")

    def register(seed, err, dataset):
        return log_and_register(run.uri, run.run_id, tiny_cnn(seed), registered_name="cmp", input_example=images(2),
                                val_top1_err=err, dataset=dataset)

    assert register(1, 0.30, cifar) == 1
    register(2, 0.10, registry.Evaluated("my-photos", "bbbb", "val"))   # better, on other data: not champion
    register(3, 0.20, registry.Evaluated("cifar10", "aaaa", "test"))    # better, on another split: not champion
    register(4, None, cifar)                                            # a final run without validation
    aliases = client.get_registered_model("cmp").aliases
    assert (aliases["candidate"], aliases["champion"]) == (4, 1)
    assert register(5, 0.25, cifar) == 5                                # better on the same data and split
    assert client.get_registered_model("cmp").aliases["champion"] == 5
    tags = client.get_model_version("cmp", "5").tags
    assert (tags["dataset"], tags["dataset_fingerprint"], tags["eval_split"]) == ("cifar10", "aaaa", "val")
    assert "val_top1_err" not in client.get_model_version("cmp", "4").tags
