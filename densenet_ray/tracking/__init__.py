"""Everything that talks to MLflow, and nothing else does:

    uri.py       which tracking URI (flag > $MLFLOW_TRACKING_URI > the embedded SQLite store) and the
                 checks that fail in seconds before any training
    runlog.py    RunLogger: one MLflow run per training run, outage-tolerant per-epoch logging
    registry.py  models logged without pickle, registered with candidate/champion aliases; fetched back
    results.py   evaluation and analysis results, into the run that trained the model
"""
