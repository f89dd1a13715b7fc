"""Issue 16, the training and tuning commands: bad input is refused on the driver in seconds, with an
`error:` line and exit status 2, before a worker starts; nothing hangs, nothing is written where it
does not belong. Real subprocesses of the CLIs, a real digits dataset, real FIFOs."""

import os
import subprocess
import sys
import time

import pytest

from densenet_ray import spaces, train
from densenet_ray import tune as T
from densenet_ray.data import sources, write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("data") / "digits"
    write.convert(sources.digits(), str(out), progress=False)
    return str(out)


def cli(module: str, *argv, cwd=None, env=None, timeout=90):
    """(exit status, stdout, stderr, seconds) of `python -m densenet_ray.MODULE ARGV`; a hang fails."""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", f"densenet_ray.{module}", *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd or REPO,
                          env={**os.environ, "PYTHONPATH": REPO, **(env or {})})
    return done.returncode, done.stdout, done.stderr, time.monotonic() - start


def refused(result, message: str) -> str:
    rc, out, err, seconds = result
    assert rc == 2, (out, err)
    assert message in err, err
    assert "Traceback" not in err + out
    assert "error:" in err
    # Refused before Ray: a local Ray start alone takes longer than this on a busy machine, and no
    # MLflow run was opened.
    assert "MLflow run" not in out and "Started a local Ray" not in out + err
    # Seconds on an idle machine (imports); 2 shared cores at load 20 stretched it past 60. The
    # structural checks above are what prove no worker started.
    assert seconds < 120, seconds
    return err


@pytest.mark.parametrize("extra,message", [
    (["--arch", "resnet50", "--max-failures", "-1"], "unknown architecture 'resnet50'"),
    (["--depth", "101"], "depth=101 is not valid for a 3-block DenseNet-BC"),
    (["--arch", "densenet121", "--depth", "100", "--image-size", "224"], "cannot be set on the ImageNet model"),
    (["--arch", "densenet121"], "cannot run on 16x16 images: it shrinks images 32x"),
    (["--compression", "0.1", "--growth-rate", "1"], "0 of the 5 feature maps"),
    (["--eval-transform", "imagenet_tencrop"], "--eval-transform 'imagenet_tencrop': expected imagenet_eval or none"),
    (["--registered-model", "a/b"], "--registered-model 'a/b': MLflow refuses it"),
    (["--workers", "0"], "--workers 0: expected at least 1"),
    (["--experiment", ""], "--experiment '': expected an MLflow experiment name"),
    (["--run-name", ".."], "--run-name '..': expected a single folder name"),
    (["--run-name", "."], "--run-name '.': expected a single folder name"),
    (["--run-name", "a/b"], "--run-name 'a/b': expected a single folder name"),
    (["--seed", "-1"], "--seed -1: expected an integer from 0"),
    (["--workers", "two"], "'two' is not an integer"),
    (["--placement-strategy", "EVERYWHERE"], "--placement-strategy 'EVERYWHERE': expected PACK"),
])
def test_configuration_errors_are_refused_before_ray(tmp_path, home, extra, message):
    # A missing --data that digits would convert itself into: refused before any data is written.
    storage, data = tmp_path / "runs", tmp_path / "digits"
    refused(cli("train", "digits", "--data", data, "--storage", storage, *extra), message)
    assert not storage.exists() and not data.exists()


def test_storage_or_data_that_is_a_file_is_named(tmp_path, home):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    err = refused(cli("train", "digits", "--data", tmp_path / "digits", "--storage", afile), f"--storage {afile}: {afile} is a file")
    err = refused(cli("train", "digits", "--data", afile, "--storage", tmp_path / "runs"), f"--data {afile}: is a file")
    assert afile.read_text() == "mine" and "--storage" not in err


def test_digits_never_converts_into_a_folder_of_someone_elses_files(tmp_path, home):
    folder = tmp_path / "photos"
    (folder / "train" / "cat").mkdir(parents=True)
    (folder / "train" / "cat" / "a.jpg").write_bytes(b"\xff\xd8 not really")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    refused(cli("train", "digits", "--data", folder, "--storage", tmp_path / "runs"),
            "converts itself only into an empty or missing folder")
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before


def test_relative_storage_is_resolved_and_said(tmp_path, home):
    # Refused later (a model that cannot run) so that nothing trains; the note comes with the configuration.
    rc, out, err, _ = cli("train", "digits", "--storage", "relruns", "--arch", "densenet121", cwd=tmp_path)
    assert rc == 2 and "Traceback" not in err
    assert f"--storage relruns is relative: using {tmp_path / 'relruns'}" in out
    assert f"storage={tmp_path / 'relruns'}" in out


@pytest.mark.parametrize("extra,message", [
    (["--gpus-per-worker", "1"], "--gpus-per-worker 1: the Ray cluster has 1 node, 4 CPUs, no GPUs, and no autoscaler"),
    (["--placement-strategy", "STRICT_SPREAD"], "STRICT_SPREAD puts each of --workers 2 on a node of its own"),
])
def test_requests_the_cluster_cannot_meet_are_refused_not_waited_for(digits, tmp_path, capfd, extra, message):
    storage = tmp_path / "runs"
    start = time.monotonic()
    assert train.main(["digits", "--data", digits, "--storage", str(storage), "--mlflow-tracking-uri",
                       f"sqlite:///{tmp_path}/mlflow.db", *extra]) == 2
    assert message in capfd.readouterr().err
    assert time.monotonic() - start < 60 and not storage.exists()


def space_file(tmp_path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


LAUGHS = "preset: digits\nspace:\n  lr: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"  x{i}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))


@pytest.mark.parametrize("text,message", [
    (LAUGHS, "aliases (*name) are not allowed"),
    ("[" * 5000 + "]" * 5000, "nested too deep"),
    ("preset: digits\nspace: {growth_rate: {choice: [12]}}\n" + "#" * 70000 + "\n", "a space file is at most 65536"),
    ("preset: digits\nspace: {lr: {choice: [" + ", ".join(["[1, 2, 3]"] * 2000) + "]}}\n", "is not a number"),
    ("preset: digits\nspace: {batch_size: {uniform: [16, 64]}}\n", "space.batch_size.uniform: batch_size is an integer"),
    ("preset: digits\nspace: {lr: {choice: [0.1, -1]}}\n", "space.lr.choice[1]: -1"),
    ("preset: digits\nscheduler: [asha]\nspace: {lr: {choice: [0.1]}}\n", "scheduler: ['asha']: expected a mapping"),
    ("preset: digits\nresources: 3\nspace: {lr: {choice: [0.1]}}\n", "resources: 3: expected a mapping"),
    ("preset: digits\nname: ../../etc\nspace: {lr: {choice: [0.1]}}\n", "name: '../../etc': expected a single folder"),
    ("preset: digits\nregistered_model: a/b\nspace: {lr: {choice: [0.1]}}\n", "MLflow refuses it"),
    ("preset: digits\nnum_samples: 100000\nspace: {lr: {uniform: [0.01, 0.1]}}\n", "a sweep runs at most 1000"),
])
def test_hostile_space_files_are_refused_at_once(tmp_path, text, message):
    start = time.monotonic()
    with pytest.raises(spaces.SpaceError) as err:
        spaces.load_space(space_file(tmp_path, text))
    assert message in str(err.value)
    assert len(str(err.value)) < 2000 and time.monotonic() - start < 20


def test_a_space_file_that_is_a_fifo_is_refused_without_being_opened(tmp_path):
    fifo = tmp_path / "space.yaml"
    os.mkfifo(fifo)
    done = subprocess.run([sys.executable, "-c", f"from densenet_ray import spaces; spaces.load_space({str(fifo)!r})"],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert "not a regular file" in done.stderr


def test_more_samples_than_the_space_has_says_so_at_once(tmp_path, capsys):
    path = space_file(tmp_path, "preset: digits\nnum_samples: 50\nspace:\n  growth_rate: {choice: [8, 12]}\n"
                                "  depth: {choice: [16, 19]}\n  bottleneck: {choice: [true, false]}\n")
    start = time.monotonic()
    assert T.main([path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "num_samples 50 asks for 50 trials, but the space has only 6 distinct valid ones" in out
    assert time.monotonic() - start < 30


def test_a_space_whose_every_trial_has_a_zero_channel_layer_is_refused(tmp_path, capsys):
    path = space_file(tmp_path, "preset: digits\nspace:\n  compression: {choice: [0.1]}\n  growth_rate: {choice: [1]}\n")
    assert T.main([path, "--dry-run"]) == 2
    assert "0 of the 5 feature maps" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--num-samples", "many"], "invalid int value: 'many'"),
    (["--num-samples", "0"], "--num-samples 0: expected 1 to 1000"),
    (["--name", ".."], "--name '..': expected a single folder name"),
])
def test_tune_flags_are_error_lines(tmp_path, argv, message):
    path = space_file(tmp_path, "preset: digits\nspace: {lr: {choice: [0.1]}}\n")
    refused(cli("tune", path, "--dry-run", *argv), message)


@pytest.mark.parametrize("kwargs,message", [
    ({"workers": 2, "cpus": 1.5, "gpus": 0, "strategy": "STRICT_PACK"}, "STRICT_PACK puts all --workers 2 on one node"),
    ({"workers": 1, "cpus": 3, "gpus": 0, "strategy": "PACK"}, "no node can hold one worker"),
    ({"workers": 3, "cpus": 1, "gpus": 0, "strategy": "STRICT_SPREAD"}, "use --workers 2 or fewer"),
])
def test_placements_two_small_nodes_cannot_give_are_refused(monkeypatch, kwargs, message):
    """On a multi-node cluster (two 2-CPU nodes, no autoscaler): what only the node sizes rule out. A one-node
    Ray, as the tests have, refuses these earlier for want of a CPU for Ray Data."""
    from densenet_ray import runtime

    nodes = [{"Alive": True, "NodeManagerAddress": f"10.0.0.{i}", "Resources": {"CPU": 2.0}} for i in (1, 2)]
    monkeypatch.setattr(runtime, "cpu_nodes", lambda: nodes)
    monkeypatch.setattr(runtime, "autoscaler_limit", lambda: None)
    with pytest.raises(runtime.ClusterError, match=message):
        runtime.require_placement(**kwargs)
    runtime.require_placement(**{**kwargs, "workers": 1, "cpus": 1})  # what fits is not refused
