"""``data``: the source, its splits and the transfer-set filters."""
from __future__ import annotations

from typing import Optional

from pydantic import Field, field_validator, model_validator

from kd_ray.core.config.base import Section

DATASETS = ("digits", "mnist", "fashion_mnist", "kmnist", "cifar10", "cifar100", "parquet", "image_folder", "hf")


class Normalization(Section):
    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _matching(self) -> "Normalization":
        if len(self.mean) != len(self.std) or min(self.std) <= 0:
            raise ValueError("give one mean and one std (> 0) per channel")
        return self


class DataConfig(Section):
    name: str = "digits"
    root: Optional[str] = None  # folder (or URI for parquet) holding the files
    download: bool = False  # torchvision sources only: download into root when missing
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # carved from the training set, stratified
    seed: int = 0  # seed of the validation split and of the nested fractions
    image_column: str = "image"  # parquet and hf sources
    label_column: str = "label"
    # hf: a Hugging Face `datasets` folder (save_to_disk, or the hub's parquet files) and its split names
    train_split: str = "train"
    test_split: str = "test"
    image_shape: Optional[list[int]] = None  # parquet: reshape flat images to (C, H, W)
    image_size: Optional[list[int]] = None  # image_folder: resize to (H, W)
    omit_classes: list[int] = []  # transfer-set filter (the paper's omitted-digit experiment)
    keep_classes: Optional[list[int]] = None  # transfer-set filter: keep only these classes
    stream: bool = False  # parquet, image_folder: stream the rows from the files in every stage, never load the source
    # per-channel {mean: [...], std: [...]} of the training images on the [0, 1] scale, when known
    # (ImageNet's, say): used instead of computing them (a streamed source skips its statistics pass)
    normalization: Optional[Normalization] = None


    @field_validator("name")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        if v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; known datasets: {list(DATASETS)}")
        return v

    @model_validator(mode="after")
    def _root_when_needed(self) -> "DataConfig":
        if self.name in ("parquet", "image_folder", "hf") and not self.root:
            raise ValueError(f"data.root is required for the {self.name!r} source")
        if self.stream and self.name == "hf":
            raise ValueError("stream: an hf source is read into memory; for data larger than memory give its parquet "
                             "files as data.name: parquet (the {bytes, path} image column reads there too)")
        if self.stream and self.name not in ("parquet", "image_folder"):
            raise ValueError(f"stream: streamed sources are parquet or image_folder; data.name is {self.name!r}")
        return self
