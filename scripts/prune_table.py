"""Table and plot of a pruning study (scripts/prune_study.sh): top-1 per method and sparsity, one-shot and fine-tuned.

    python scripts/prune_table.py outputs/prune_study [--png docs/results/pruning.png]

Reads every ``summary.json`` under the study directory: the dense run (``dense/``), the DynaDiag runs
(``dynadiag/``) and the ``prune.py`` runs (``prune/``); prints a Markdown table of the final validation top-1.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from collections import defaultdict

METHODS = ("magnitude", "wanda", "wanda_layer", "dsnot", "diag")
LABELS = {
    "magnitude": "magnitude",
    "wanda": "Wanda (per row)",
    "wanda_layer": "Wanda (per layer)",
    "dsnot": "DSnoT (Wanda init)",
    "diag": "dense-to-diagonal",
}


def load(study: str) -> tuple[dict, dict, dict]:
    dense, dynadiag, pruned = {}, {}, defaultdict(dict)
    for path in glob.glob(os.path.join(study, "**", "summary.json"), recursive=True):
        with open(path, encoding="utf-8") as fh:
            s = json.load(fh)
        rel = os.path.relpath(path, study)
        if rel.startswith("dense"):
            dense = s
        elif rel.startswith("dynadiag"):
            dynadiag[float(s["sparsity"])] = s
        elif "prune_method" in s:
            method = "wanda_layer" if s.get("prune_variant") == "wanda_layer" else s["prune_method"]
            pruned[(method, float(s["sparsity"]))][int(s["finetune_epochs"])] = s
    return dense, dynadiag, pruned


def table(dense: dict, dynadiag: dict, pruned: dict) -> str:
    sparsities = sorted({k[1] for k in pruned} | set(dynadiag))
    epochs = sorted({e for runs in pruned.values() for e in runs if e > 0})
    ft = epochs[0] if epochs else None
    head = "| method | " + " | ".join(f"{s:g}" for s in sparsities) + " |"
    rows = [head, "|" + "---|" * (len(sparsities) + 1)]
    if dense:
        rows.append(
            f"| dense ({dense['epochs']} epochs) | "
            + " | ".join(f"{dense['val_top1_final']:.2f}" for _ in sparsities)
            + " |"
        )
    for method in (m for m in METHODS if any(k[0] == m for k in pruned)):
        for e, tag in ((0, "one-shot"), (ft, f"+ {ft}-epoch fine-tune")):
            if e is None:
                continue
            cells = []
            for s in sparsities:
                run = pruned.get((method, s), {}).get(e)
                cells.append("-" if run is None else f"{run['val_top1_final']:.2f}")
            rows.append(f"| {LABELS[method]}, {tag} | " + " | ".join(cells) + " |")
    if dynadiag:
        cells = [f"{dynadiag[s]['val_top1_final']:.2f}" if s in dynadiag else "-" for s in sparsities]
        n = next(iter(dynadiag.values()))["epochs"]
        rows.append(f"| DynaDiag from scratch ({n} epochs) | " + " | ".join(cells) + " |")
    achieved = []
    for method in (m for m in METHODS if any(k[0] == m for k in pruned)):
        vals = [pruned.get((method, s), {}).get(0, {}).get("pruned_layers_sparsity") for s in sparsities]
        achieved.append(f"| {LABELS[method]} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in vals) + " |")
    if dynadiag:
        vals = [dynadiag[s].get("sparsity_target_layers") if s in dynadiag else None for s in sparsities]
        achieved.append("| DynaDiag | " + " | ".join("-" if v is None else f"{v:.4f}" for v in vals) + " |")
    out = "\n".join(rows)
    out += "\n\nAchieved sparsity of the sparsified layers:\n\n" + "\n".join([head, rows[1], *achieved])
    return out


def plot(dense: dict, dynadiag: dict, pruned: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = dict(zip(METHODS, ("tab:gray", "tab:blue", "tab:purple", "tab:green", "tab:orange")))
    for method in METHODS:
        sp = sorted(s for (m, s) in pruned if m == method)
        for e, style in ((0, "--"), (None, "-")):
            xs, ys = [], []
            for s in sp:
                runs = pruned[(method, s)]
                key = e if e is not None else max(runs)
                if key in runs and (e is not None or key > 0):
                    xs.append(s)
                    ys.append(runs[key]["val_top1_final"])
            if xs:
                label = f"{LABELS[method]}, {'one-shot' if e == 0 else 'fine-tuned'}"
                ax.plot(xs, ys, style, marker="o", color=colors[method], label=label)
    if dynadiag:
        sp = sorted(dynadiag)
        ax.plot(
            sp,
            [dynadiag[s]["val_top1_final"] for s in sp],
            "-",
            marker="s",
            color="tab:red",
            lw=2,
            label="DynaDiag from scratch",
        )
    if dense:
        ax.axhline(dense["val_top1_final"], color="black", lw=1, ls=":", label="dense")
    ax.set_xlabel("sparsity of the sparsified layers")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("digits, ViT (vit_mini): post-training sparsification vs DynaDiag")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="directory written by scripts/prune_study.sh")
    parser.add_argument("--png", default=None, help="also write a plot here")
    args = parser.parse_args()
    dense, dynadiag, pruned = load(args.study)
    if not (dense or dynadiag or pruned):
        raise SystemExit(f"no summary.json under {args.study}")
    print(table(dense, dynadiag, pruned))
    if args.png:
        plot(dense, dynadiag, pruned, args.png)
        print(f"\nplot: {args.png}")


if __name__ == "__main__":
    main()
