"""Run by ``make wheel-test`` inside a fresh virtual environment, from a folder outside the checkout.

The installed wheel must bring its kernel sources: the ``cpu`` backend builds them into an empty cache and a
frozen DiagLinear on it matches the ``reference`` backend. The check runs as a core install (``pip install
dynadiag``, no extras) would: the venv borrows ``.venv``'s packages, so every extra's packages are hidden
first (a ``None`` entry in ``sys.modules`` makes ``import`` fail and ``find_spec`` report them missing).
"""

import importlib
import importlib.metadata
import os
import pkgutil
import sys
import tempfile
from pathlib import Path

EXTRAS = ("hydra", "hydra_plugins", "omegaconf", "submitit", "wandb", "sklearn", "matplotlib")
EXTRAS += ("onnx", "onnxruntime", "onnxscript", "lightning", "pytorch_lightning", "transformers", "accelerate")
for hidden in EXTRAS:
    sys.modules[hidden] = None  # type: ignore[assignment]

import timm  # noqa: E402
import torch  # noqa: E402

import dynadiag  # noqa: E402
from dynadiag import DiagLinear, DiagSparsifyConfig, from_pretrained, save_pretrained, sparsify_  # noqa: E402
from dynadiag.kernels import get_backend, ops  # noqa: E402

package = Path(dynadiag.__file__).resolve().parent
checkout = Path(sys.argv[1]).resolve()
assert checkout not in package.parents, f"imported the checkout's dynadiag ({package}), not the wheel's"
assert package / "csrc" == ops.CSRC, f"kernel sources not found in the installed package: {ops.CSRC}"
assert os.environ["DYNADIAG_CACHE"] and not any(Path(os.environ["DYNADIAG_CACHE"]).iterdir()), "cache not empty"

# the core install: the extras' packages are optional requirements of the wheel, and no module imports them
for requirement in importlib.metadata.requires("dynadiag") or []:
    name = requirement.split(";")[0].strip().lower()
    if name.startswith(("hydra", "omegaconf", "wandb", "scikit-learn", "matplotlib", "onnx", "pytorch-lightning")):
        assert "extra ==" in requirement, f"core requirement on an extra's package: {requirement}"
modules = [info.name for info in pkgutil.walk_packages(dynadiag.__path__, "dynadiag.")]
for name in modules:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:  # an integration module may need its framework (Lightning, ...): allowed
        missing = (exc.name or "").split(".")[0]
        assert missing and missing not in EXTRAS, f"{name} imports the extra {missing!r} at import time"
leaked = sorted(m for m in EXTRAS if sys.modules.get(m) is not None)
assert not leaked, f"extras imported: {leaked}"

get_backend("cpu", "cpu")  # builds csrc/ from the wheel; raises with the compiler's message if it cannot

torch.manual_seed(0)
layer = DiagLinear(96, 160, sparsity=0.9, backend="cpu").freeze_()
x = torch.randn(37, 96)
reference = DiagLinear(96, 160, sparsity=0.9, backend="reference")
reference.load_state_dict(layer.state_dict())
got, want = layer(x), reference(x)
torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

# sparsify a timm model, freeze, and round-trip the deployable artifact
kwargs = {"img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 5, "embed_dim": 48, "depth": 2}
model = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()
report = sparsify_(model, DiagSparsifyConfig(sparsity=0.9, backend="cpu"))
for module in model.modules():
    if isinstance(module, DiagLinear):
        module.freeze_()
images = torch.randn(2, 1, 16, 16)
with tempfile.TemporaryDirectory() as artifact:
    save_pretrained(model, artifact, base_model_name="vit_tiny_patch16_224", base_model_kwargs=kwargs)
    loaded = from_pretrained(artifact, backend="cpu").eval()
    torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)

# a feature of an extra fails with the install line
from dynadiag.data import DataConfig, build_datasets  # noqa: E402

try:
    build_datasets(DataConfig(name="digits"))
except ImportError as exc:
    assert "dynadiag[train]" in str(exc), exc
else:
    raise AssertionError("the digits data loaded with scikit-learn hidden")

print(
    f"wheel ok: dynadiag {package} without extras ({len(modules)} modules import), kernel sources {ops.CSRC}, "
    f"cpu == reference on a frozen 96->160 layer, {len(report.layers)} layers sparsified, save/from_pretrained exact"
)
