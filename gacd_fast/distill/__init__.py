"""The end-to-end distillation pipeline: data, models, methods, training, evaluation, reports.

    from gacd_fast.distill import DemoConfig, demo
    demo(DemoConfig(out_dir="runs/demo"))

The pipeline imports the package (GACDLoss, PGD, FGSM); the package never imports the pipeline.
"""
from .cka import linear_cka
from .config import ConfigError, DemoConfig, DistillConfig, EvaluateConfig, TeacherConfig, load_config, save_config
from .data import DatasetFileError, ImageDataset, load_cifar, load_dataset, load_digits_split, load_stl10
from .models import MODELS, build_model
from .pipeline import demo, distill, evaluate, train_teacher

__all__ = [
    "TeacherConfig", "DistillConfig", "EvaluateConfig", "DemoConfig", "ConfigError", "load_config", "save_config",
    "train_teacher", "distill", "evaluate", "demo",
    "ImageDataset", "DatasetFileError", "load_dataset", "load_digits_split", "load_cifar", "load_stl10",
    "MODELS", "build_model", "linear_cka",
]
