import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from dynadiag import DiagLinear
from dynadiag.export import export_onnx, standard_ops
from dynadiag.kernels import available_backends


def _model(backend: str) -> nn.Module:
    frozen = DiagLinear(32, 48, sparsity=0.9, backend=backend, permute=True)
    soft = DiagLinear(48, 16, sparsity=0.75, backend=backend)
    for layer in (frozen, soft):
        torch.nn.init.normal_(layer.alpha)
    soft.temperature = 0.5
    return nn.Sequential(frozen.freeze_(), nn.GELU(), soft).eval()


def test_standard_ops_restores_backends():
    model = _model("auto")
    with standard_ops(model):
        assert {layer.backend for layer in model.modules() if isinstance(layer, DiagLinear)} == {"reference"}
    assert {layer.backend for layer in model.modules() if isinstance(layer, DiagLinear)} == {"auto"}


def test_onnx_export_runs_in_onnxruntime_and_matches(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = _model("auto")
    path = export_onnx(model, (torch.randn(4, 32),), tmp_path / "model.onnx")
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    assert all(node.domain in ("", "ai.onnx") for node in graph.graph.node)  # standard operators only
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(9, 32)  # another batch size: the batch dimension is dynamic
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), model(x).detach(), rtol=1e-5, atol=1e-5)


def test_torch_export_program_needs_the_ops_registered(tmp_path):
    if "cpu" not in available_backends("cpu"):
        pytest.skip("the cpu kernels cannot be built here")
    model = _model("cpu")
    x = torch.randn(5, 32)
    program = torch.export.export(model, (x,))
    assert any("dynadiag" in str(node.target) for node in program.graph.nodes)
    torch.export.save(program, tmp_path / "model.pt2")
    torch.save({"x": x, "y": model(x).detach()}, tmp_path / "io.pt")
    with standard_ops(model):
        plain = torch.export.export(model, (x,))
    assert not any("dynadiag" in str(node.target) for node in plain.graph.nodes)
    torch.testing.assert_close(plain.module()(x), model(x), rtol=1e-5, atol=1e-5)
    script = textwrap.dedent(
        f"""
        import torch
        from dynadiag.export import load_ops
        io = torch.load({str(tmp_path / "io.pt")!r})
        load_ops("cpu")
        program = torch.export.load({str(tmp_path / "model.pt2")!r})
        torch.testing.assert_close(program.module()(io["x"]), io["y"], rtol=1e-5, atol=1e-5)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_deploy_doc_examples_run_in_order(tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    if "cpu" not in available_backends("cpu"):
        pytest.skip("the cpu kernels cannot be built here")
    doc = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)  # the examples write their files into the working directory
    namespace = {"__name__": "__doc_example__"}
    for index, block in enumerate(blocks):  # one namespace: later blocks use the model the first one built
        exec(compile(block, f"{doc.name}[block {index}]", "exec"), namespace)
    assert (tmp_path / "vit_tiny_diag" / "model.safetensors").is_file() and (tmp_path / "model.onnx").is_file()
    torch.testing.assert_close(namespace["y"], namespace["model"](namespace["x"]), rtol=1e-5, atol=1e-5)
