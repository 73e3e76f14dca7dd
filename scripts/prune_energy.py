"""Share of the activation-weighted energy ``sum W^2 E[x^2]`` of the target layers that magnitude, Wanda and
dense-to-diagonal selection keep, on a dense checkpoint (statistics of 8 training batches, dense model).

    python scripts/prune_energy.py outputs/prune_study/dense
"""

import sys

import torch
from hydra.utils import instantiate

from dynadiag import functional as DF
from dynadiag.checkpoint import load_checkpoint
from dynadiag.data import build_loaders
from dynadiag.prune import calibration_batches, collect_input_stats, magnitude_mask, target_linears, wanda_mask
from dynadiag.prune.diag import diag_scores

torch.set_num_threads(1)
state = load_checkpoint(sys.argv[1] if len(sys.argv) > 1 else "outputs/prune_study/dense")
model = instantiate(state["config"]["model"])
model.load_state_dict(state["model"])
model.eval()
data = build_loaders(instantiate(state["config"]["data"]), seed=0)
batches = calibration_batches(data.train_loader, 8, "cpu")
names = target_linears(model)
stats = collect_input_stats(model, {n: model.get_submodule(n) for n in names}, batches, stop_early=False)
for s in (0.5, 0.8, 0.9, 0.95):
    kept = {"magnitude": 0.0, "wanda": 0.0, "diag": 0.0}
    total = 0.0
    for n in names:
        w = model.get_submodule(n).weight.detach().double()
        st = stats[n]
        e = w.square() * st.mean_sq[None, :]
        total += e.sum().item()
        kept["magnitude"] += (e * magnitude_mask(w, s)).sum().item()
        kept["wanda"] += (e * wanda_mask(w, st, s)).sum().item()
        k = DF.num_active_diagonals(w.shape[1], w.shape[0], s)
        kept["diag"] += diag_scores(w, st).topk(k).values.sum().item()
    print(s, {m: f"{100 * v / total:.1f}%" for m, v in kept.items()})
