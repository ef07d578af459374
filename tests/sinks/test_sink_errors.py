"""What a user sees when a sink's library is missing, or when something else is passed as a sink."""

from __future__ import annotations

import sys

import pytest
import torch

import gradguard
from gradguard.sinks import MLflow, TensorBoard, WandB

# Every module a sink imports, made unimportable the way an absent package is.
_HIDE = {
    "tensorboard": ["tensorboard", "tensorboard.compat.proto.summary_pb2", "torch.utils.tensorboard"],
    "wandb": ["wandb"],
    "mlflow": ["mlflow", "mlflow.entities", "mlflow.tracking", "mlflow.utils.validation"],
}


@pytest.mark.parametrize(
    ("extra", "make"),
    [("tensorboard", lambda tmp: TensorBoard(tmp)), ("wandb", lambda tmp: WandB()), ("mlflow", lambda tmp: MLflow())],
)
def test_a_missing_library_names_the_extra_to_install(extra, make, tmp_path, monkeypatch):
    for module in _HIDE[extra]:
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=rf"pip install 'gradguard\[{extra}\]'"):
        make(tmp_path)
    assert not list(tmp_path.iterdir())  # nothing was written before the error


@pytest.mark.slow
def test_importing_gradguard_sinks_does_not_import_the_backends():
    import subprocess

    code = (
        "import sys, gradguard.sinks; "
        "print(sorted(m for m in ('tensorboard', 'wandb', 'mlflow', 'torch.utils.tensorboard') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_object_without_write_is_not_a_sink(tmp_path):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"sinks must have a write\(rows, findings\) method"):
        gradguard.watch(model, sinks=[str(tmp_path)])
