"""Run by ``make wheel-test`` inside a fresh virtual environment, from a folder outside the checkout.

The installed wheel must bring its kernel sources: the ``cpu`` backend builds them into an empty cache and a
frozen DiagLinear on it matches the ``reference`` backend.
"""

import os
import sys
from pathlib import Path

import torch

import dynadiag
from dynadiag import DiagLinear
from dynadiag.kernels import get_backend, ops

package = Path(dynadiag.__file__).resolve().parent
checkout = Path(sys.argv[1]).resolve()
assert checkout not in package.parents, f"imported the checkout's dynadiag ({package}), not the wheel's"
assert package / "csrc" == ops.CSRC, f"kernel sources not found in the installed package: {ops.CSRC}"
assert os.environ["DYNADIAG_CACHE"] and not any(Path(os.environ["DYNADIAG_CACHE"]).iterdir()), "cache not empty"
get_backend("cpu", "cpu")  # builds csrc/ from the wheel; raises with the compiler's message if it cannot

torch.manual_seed(0)
layer = DiagLinear(96, 160, sparsity=0.9, backend="cpu").freeze_()
x = torch.randn(37, 96)
reference = DiagLinear(96, 160, sparsity=0.9, backend="reference")
reference.load_state_dict(layer.state_dict())
got, want = layer(x), reference(x)
torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
print(f"wheel ok: dynadiag {package}, kernel sources {ops.CSRC}, cpu == reference on a frozen 96->160 layer")
