"""A study's MLflow side: one experiment per study, a parent run, the trials' runs as its children."""

from __future__ import annotations

from optstudy.study.spec import Study
from optstudy.tracking import MLflowLogger, tracking_uri


def create_parent(spec: Study) -> tuple[str, str, str]:
    """Creates the study's parent run (params: the study file, flattened); returns ``(tracking uri, run id,
    experiment id)``."""
    uri = tracking_uri()
    parent = MLflowLogger(uri, spec.name, run_name=f"study {spec.name}",
                          tags={"optuna.study": spec.name, "optstudy.role": "study"})
    parent.log_hyperparams({"study": spec.source})
    parent.close("FINISHED")  # the report is logged to it later; MLflow accepts artifacts on finished runs
    return uri, parent.run_id, parent.experiment_id


def log_report(uri: str, run_id: str, directory) -> None:
    """The study's report (HTML and CSV tables) as artifacts of its parent run, under ``report/``."""
    from mlflow import MlflowClient

    MlflowClient(uri).log_artifacts(run_id, str(directory), "report")
