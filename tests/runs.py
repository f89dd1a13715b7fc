"""What the end-to-end training tests share: the digits job's command line and the per-epoch metric check.

    from runs import flags, assert_each_epoch_once
"""


def flags(digits_data, places, *extra):
    return ["digits", "--data", digits_data, "--storage", places["storage"],
            "--mlflow-tracking-uri", places["uri"], *extra]


def assert_each_epoch_once(client, run, epochs: int):
    for key in ("train_loss", "val_top1_err", "val_top5_err", "lr", "images_per_s", "data_wait_s"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(epochs)), f"{key}: steps {sorted(steps)}"
