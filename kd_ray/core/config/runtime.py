"""``runtime``: where it runs and writes, what it tracks, which stages run."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from kd_ray.core.config.base import Section


class StorageOptions(Section):
    endpoint_url: Optional[str] = None  # e.g. http://minio.internal:9000 (sets AWS_ENDPOINT_URL)
    region: Optional[str] = None  # sets AWS_DEFAULT_REGION

    def env(self) -> dict[str, str]:
        """The standard AWS variables these options stand for (pyarrow, Ray and boto3 read them)."""
        names = {"endpoint_url": "AWS_ENDPOINT_URL", "region": "AWS_DEFAULT_REGION"}
        return {names[k]: v for k, v in self.model_dump().items() if v is not None}


class RuntimeConfig(Section):
    address: Optional[str] = None  # Ray address; None: RAY_ADDRESS, else a local cluster
    # local folder or s3:// / gs:// / file:// URI. A relative folder is made absolute against
    # the directory the config is loaded in: Ray actors and Tune trials (which run in their
    # trial folders) have other working directories, and must all write to the same place.
    storage_path: str = Field("./runs", validate_default=True)
    num_cpus: Optional[int] = Field(None, gt=0)  # only for a local cluster started by kd_ray
    num_gpus: Optional[int] = Field(None, ge=0)
    shared_filesystem: bool = False  # a local storage_path that every node mounts (NFS)
    # an S3-compatible endpoint for storage_path, instead of the AWS variables (credentials stay
    # in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the instance profile, never in a config)
    storage_options: StorageOptions = StorageOptions()
    # Ray's worker logs, Ray Data's progress bars and Tune's trial tables on the console (else
    # they go to Ray's log files under /tmp/ray/session_latest/logs); `kd-ray --verbose` sets it
    verbose: bool = False
    # how long a stage waits for the autoscaler to add the nodes it needs before failing
    scale_timeout_s: float = Field(600.0, gt=0)
    # autocast for teachers', students' and predictors' forward passes: "auto" is bf16 on a GPU
    # and float32 on a CPU; "fp16" also scales the loss (torch.amp.GradScaler)
    mixed_precision: Literal["auto", "off", "bf16", "fp16"] = "auto"
    # where finished teachers' and students' per-epoch metrics go (kd_ray/stages/tracking.py)
    tracking: list[Literal["tensorboard", "mlflow", "wandb"]] = ["tensorboard"]
    # MLflow tracking URI (a server, sqlite:///..., or a folder); None: <storage_path>/<name>/mlruns
    mlflow_uri: Optional[str] = None
    # Weights & Biases: project and entity (None: WANDB_PROJECT / WANDB_ENTITY, else the experiment's
    # name and your default entity); mode online, or offline (files under <storage>/<name>/wandb,
    # `wandb sync` them later); None: WANDB_MODE, else offline
    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None
    wandb_mode: Optional[Literal["online", "offline"]] = None
    # what `kd-ray run` and jobs/pipeline.py run, in this order (a stage computes what it
    # needs from earlier ones when missing, and reuses what is finished)
    stages: list[Literal["teachers", "soft-targets", "sweep", "report"]] = ["teachers", "soft-targets", "sweep", "report"]

    @field_validator("storage_path")
    @classmethod
    def _storage_path(cls, v: str) -> str:
        from kd_ray.core.storage import absolute

        if not v:
            raise ValueError("give a folder or an s3:// / gs:// URI")
        return absolute(v)

    @model_validator(mode="after")
    def _mlflow(self) -> "RuntimeConfig":
        import importlib.util

        from kd_ray.core.storage import is_local

        if "wandb" in self.tracking and importlib.util.find_spec("wandb") is None:
            raise ValueError("tracking: wandb is not installed; `pip install wandb` or drop wandb")
        if "mlflow" not in self.tracking:
            return self
        if importlib.util.find_spec("mlflow") is None:
            raise ValueError("tracking: mlflow is not installed; `pip install mlflow-skinny` or drop mlflow")
        if self.mlflow_uri is None and not is_local(self.storage_path):
            raise ValueError(f"mlflow_uri: MLflow's file store needs a folder, but storage_path is "
                             f"{self.storage_path}; give an MLflow server, sqlite:///... or a folder")
        return self

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one stage")
        order = ["teachers", "soft-targets", "sweep", "report"]
        if v != sorted(set(v), key=order.index):
            raise ValueError(f"stages must be distinct and in pipeline order {order}; got {v}")
        return v
