import pytest
import torch

from dynadiag import DiagLinear
from dynadiag import functional as DF
from dynadiag.kernels import BackendUnavailableError, available_backends, backend_names, get_backend


def test_reference_always_available():
    assert "reference" in available_backends("cpu")
    assert get_backend("reference", "cpu").name == "reference"


def test_auto_races_only_available_kernels():
    auto = get_backend("auto", "cpu")
    assert auto.name == "auto" and auto is get_backend("auto", "cpu")
    assert set(auto.candidates) <= set(available_backends("cpu"))


def test_unknown_backend_lists_choices():
    with pytest.raises(BackendUnavailableError, match=r"unknown backend 'nope'.*reference"):
        get_backend("nope", "cpu")


def test_explicit_unavailable_backend_fails_loudly():
    # CUDA kernels cannot run on CPU tensors: an explicit choice must fail with what is available.
    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' cannot run on cpu.*Available here"):
        get_backend("cuda", "cpu")


def test_layer_with_unknown_backend_fails_at_forward():
    layer = DiagLinear(4, 4, sparsity=0.5, backend="nope").freeze_()
    with pytest.raises(ValueError, match="unknown backend"):
        layer(torch.randn(2, 4))


@pytest.mark.parametrize("in_f,out_f", [(7, 3), (3, 7), (5, 5)])
def test_reference_backend_matches_placement(in_f, out_f):
    num_diag, length = DF.diag_dims(in_f, out_f)
    offsets = torch.tensor([0, 2, num_diag - 1])
    values = torch.randn(3, length)
    x = torch.randn(4, in_f)
    bias = torch.randn(out_f)
    y = get_backend("reference").diag_linear(x, values, offsets, bias, in_f, out_f)
    weight = torch.zeros(out_f, in_f)
    rows, cols = DF.diag_index(in_f, out_f, offsets)
    weight[rows, cols] = values
    assert torch.allclose(y, x @ weight.T + bias, atol=1e-6)
    assert "auto" in backend_names()
