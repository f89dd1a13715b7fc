# The MLflow tracking server of cluster/kuberay/mlflow.yaml: MLflow with its basic-auth app, the
# PostgreSQL driver for the backend store and boto3 for the S3 artifact store.
#
#   docker build -f docker/mlflow.Dockerfile -t registry.example.com/densenet-ray-mlflow:3.17.2 .
#
# The build context is the repository root (see the root .dockerignore); versions: docker/constraints.txt.
FROM python:3.11-slim-trixie

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY docker/constraints.txt docker/mlflow-requirements.txt /tmp/mlflow/
RUN pip install --no-cache-dir --constraint /tmp/mlflow/constraints.txt -r /tmp/mlflow/mlflow-requirements.txt \
    && rm -rf /tmp/mlflow \
    && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin mlflow

USER 1000:1000
WORKDIR /home/mlflow
EXPOSE 5000
# cluster/kuberay/mlflow.yaml gives the real command (basic-auth, stores, allowed hosts).
CMD ["mlflow", "server", "--help"]
