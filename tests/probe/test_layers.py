"""Layer names are the user's model's, whatever wrappers training libraries put around it."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from gradguard.probe.layers import find_layers


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_checkpoint_wrapper_parts_are_left_out_of_names():
    plain = _model()
    wrapped = _model()
    wrapped[0] = checkpoint_wrapper(wrapped[0])
    got = find_layers(wrapped)
    assert got.names == find_layers(plain).names == ["0", "2"]
    assert got.param_names == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_compiled_and_data_parallel_models_keep_their_names():
    model = _model()
    for outer in (torch.compile(model, backend="eager"), nn.DataParallel(model)):
        assert find_layers(outer).names == ["0", "2"]
        assert find_layers(outer).params[0] is model[0].weight
