"""What the commands on a trained model share: their first arguments and how errors reach people.

    p = model_parser("evaluate", __doc__, logs=True)   # MODEL, --mlflow-tracking-uri, --trust-pickle
    try: ...
    except cli.ERRORS as err:
        return cli.error(err)                          # "error: ..." on stderr, exit status 2
"""

from __future__ import annotations

import argparse
import sys

from densenet_ray import checkpoint
from densenet_ray.data import DataError
from densenet_ray.runtime import ClusterError
from densenet_ray.tracking.registry import MODEL_URIS
from densenet_ray.tracking.uri import TrackingError

ACCEPTED = f"{MODEL_URIS}, or {checkpoint.ACCEPTED}"


class ModelError(Exception):
    """A MODEL that cannot be used; the message names it, what is wrong and what is accepted."""


# Errors whose message is meant for people: printed without a traceback.
ERRORS = (ModelError, DataError, TrackingError, ClusterError)


def model_parser(module: str, doc: str, *, logs: bool) -> argparse.ArgumentParser:
    """The command line every command on a trained model starts from: MODEL, where it lives
    (--mlflow-tracking-uri; `logs`: results are logged there too) and --trust-pickle."""
    p = argparse.ArgumentParser(prog=f"python -m densenet_ray.{module}", description=doc.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", metavar="MODEL", help=ACCEPTED)
    p.add_argument("--mlflow-tracking-uri", help="where models:/ and runs:/ live" + (" and results are logged"
                   if logs else "") + " (default: $MLFLOW_TRACKING_URI, else the embedded store)")
    p.add_argument("--trust-pickle", action="store_true", help="allow a model that needs pickle to load "
                   "(it can run any code): only for models from people you trust")
    return p


def error(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2
