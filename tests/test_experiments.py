"""Every paper-table experiment composes, its sweep grid is valid, and it trains for two steps on synthetic data.

The experiments' own models (ViT-B/L, Mixer-S, ResNet-50 at 224 px) are shrunk for the runs, so the whole file
stays fast on 2 CPU cores; what is checked is the wiring of each config (groups, interpolations, sweep axes,
method construction), which is what rots.
"""

import csv
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # train.py and scripts/ are not part of the package
import train  # noqa: E402
from dynadiag.functional import validate_sparsity  # noqa: E402
from scripts import make_tables  # noqa: E402

CONFIGS = os.path.join(ROOT, "configs")
EXPERIMENTS = sorted(f[: -len(".yaml")] for f in os.listdir(os.path.join(CONFIGS, "experiment")) if f.endswith(".yaml"))
PAPER = {"paper_imagenet_vit", "paper_cifar_vit", "paper_imagenet_mixer", "paper_imagenet_resnet50", "paper_speedup"}

#: two CPU steps on tiny synthetic images; the experiment's recipe (optimizer, schedules, method) stays as is
SMOKE = [
    "data=synthetic",
    "data.img_size=16",
    "data.patch_size=4",
    "data.in_chans=3",
    "data.num_classes=10",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "data.num_train=32",
    "data.num_val=16",
    "trainer.max_steps=2",
    "trainer.inference_iters=0",
    "trainer.final_inference_iters=1",
    "trainer.save_checkpoints=false",
    "trainer.progress=off",
    "logger=local",
    "backend=reference",  # no JIT kernel build in this test; the kernels have their own tests
]


def _tiny_model(cfg) -> list[str]:
    """Shrink the experiment's model within its family (ViT, Mixer: width and depth; ResNet: one block per stage)."""
    name = str(cfg.model.name)
    if name.startswith(("vit_", "deit_")):
        return ["++model.embed_dim=32", "++model.depth=1", "++model.num_heads=2"]
    if name.startswith("mixer_"):
        return ["++model.embed_dim=32", "++model.num_blocks=1"]
    if name.startswith("resnet"):
        return ["++model.layers=[1,1,1,1]"]
    return []


def _compose(overrides, hydra_config: bool = False):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra_config)


def _grid(name: str) -> dict[str, list[str]]:
    cfg = _compose([f"+experiment={name}"], hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) if cfg.hydra.sweeper.params else {}
    return {k: [v.strip() for v in str(val).split(",")] for k, val in params.items()}


def _run(cfg, run_dir) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared 2-core machine: avoid OpenMP spin-waiting
    try:
        return train.train(cfg, run_dir=str(run_dir))
    finally:
        torch.set_num_threads(threads)


def test_paper_tables_have_an_experiment():
    assert PAPER | {"digits_study"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", sorted(PAPER | {"digits_study"}))
def test_experiment_documents_its_recipe(name):
    with open(os.path.join(CONFIGS, "experiment", f"{name}.yaml"), encoding="utf-8") as fh:
        text = fh.read()
    assert text.startswith("# @package _global_\n")
    assert "Recipe source" in text


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_sweep_grid_composes(name):
    """Group axes (sparsifier, model, data) compose option by option; scalar axes are set on the composed config."""
    base = _compose([f"+experiment={name}"], hydra_config=True)
    choices = set(base.hydra.runtime.choices)
    grid = _grid(name)
    if name in PAPER or name == "digits_study":  # a table: methods x sparsities
        assert "sparsity" in grid and "sparsifier" in grid
    for key, values in grid.items():
        assert values and all(values), f"{name}: empty value in hydra.sweeper.params.{key}"
        if key not in choices:
            assert OmegaConf.select(base, key, default="<missing>") != "<missing>", f"{name}: no config key {key}"
            for value in values:
                cfg = base.copy()
                OmegaConf.update(cfg, key, yaml.safe_load(value))
                if key == "sparsity":
                    validate_sparsity(cfg.sparsity, where="")
            continue
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            for value in values:
                cfg = compose("config", overrides=[f"+experiment={name}", f"{key}={value}"])
                if key == "sparsifier":  # the method is built as train.py builds it (without a model)
                    assert instantiate(cfg.sparsifier, _convert_="all").name == value


#: ResNet-50's soft-phase diagonal convolutions take ~10 s per CPU step even with one block per stage
SLOW_RUNS = {"paper_imagenet_resnet50"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_RUNS else n for n in EXPERIMENTS]
)
def test_experiment_trains_two_steps(name, tmp_path):
    base = _compose([f"+experiment={name}"])
    cfg = _compose([f"+experiment={name}", *SMOKE, *_tiny_model(base)])
    assert cfg.trainer.epochs == base.trainer.epochs and cfg.optim == base.optim  # the recipe is untouched
    summary = _run(cfg, tmp_path)
    method = instantiate(base.sparsifier, _convert_="all")
    assert summary["steps"] == 2 and summary["method"] == method.name
    assert summary["infer_images_per_s"] > 0 and summary["val_top1_final"] is not None
    # the experiment's sparsity reached the model's layers (measured on them: K/P or mask non-zeros)
    assert summary["sparsity_target_layers"] == pytest.approx(method.sparsity, abs=0.03)
    assert math.isfinite(summary["val_loss_final"])


def test_imagenet_recipe_follows_deit():
    cfg = _compose(["+experiment=paper_imagenet_vit"])
    assert cfg.data.name == "imagenet" and cfg.trainer.epochs == 300 and cfg.optim.opt == "adamw"
    assert cfg.data.batch_size == 1024 and cfg.optim.lr == pytest.approx(5e-4 * cfg.data.batch_size / 512)
    assert cfg.optim.weight_decay == 0.05 and cfg.lr_schedule.warmup_epochs == 5
    assert (cfg.data.mixup_alpha, cfg.data.cutmix_alpha, cfg.data.label_smoothing) == (0.8, 1.0, 0.1)
    assert cfg.data.auto_augment.startswith("rand-m9") and cfg.model.drop_path_rate == 0.1
    assert _grid("paper_imagenet_vit")["sparsity"] == ["0.6", "0.7", "0.8", "0.9", "0.95"]


#: the machine-readable line of each paper experiment's "Recipe source" comment
CITED = re.compile(r"^# Cited values: global batch (\d+), lr (\S+), epochs (\S+)$", re.MULTILINE)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipe_has_the_global_batch_lr_and_epochs_its_source_cites(name):
    """``data.batch_size`` is the global batch (train.py splits it over the ranks), so a paper recipe sets the
    published global batch itself, next to the published lr and epochs; no per-rank batch hides in a comment."""
    with open(os.path.join(CONFIGS, "experiment", f"{name}.yaml"), encoding="utf-8") as fh:
        text = fh.read()
    assert "per rank" not in text
    (cited,) = CITED.findall(text)
    batch, lr, epochs = cited
    cfg = _compose([f"+experiment={name}"])
    assert cfg.data.batch_size == int(batch)
    if lr != "n/a":
        assert cfg.optim.lr == pytest.approx(float(lr), rel=1e-12)
    if epochs != "n/a":
        assert cfg.trainer.epochs == int(epochs)
    assert name == "paper_speedup" or "n/a" not in cited  # only the throughput table cites no recipe


def test_global_batch_is_split_over_the_ranks():
    import composition

    node = {"_target_": "dynadiag.data.DataConfig", "name": "synthetic", "batch_size": 32, "num_train": 64}
    assert composition.build_data(node, seed=0).train_loader.batch_size == 32
    for rank in range(4):
        loaders = composition.build_data(node, seed=0, rank=rank, world_size=4)
        assert loaders.train_loader.batch_size == 8 and len(loaders.train_loader) == 2  # same steps per epoch


def test_digits_folds_partition_the_data():
    from dynadiag.data import DataConfig, build_datasets

    seen = []
    for fold in range(5):
        train_ds, val_ds = build_datasets(DataConfig(name="digits", num_folds=5, fold=fold))
        assert len(train_ds) + len(val_ds) == 1797
        counts = torch.bincount(val_ds.labels, minlength=10)
        assert counts.min() >= 34 and counts.max() <= 37  # stratified: ~180 images per class / 5
        seen.append(val_ds.images.flatten(1))
    flat = torch.cat(seen)
    # every image is validated exactly once: the 5 validation sets together are the whole dataset
    whole = build_datasets(DataConfig(name="digits", num_folds=5, fold=0))
    everything = torch.cat([whole[0].images.flatten(1), whole[1].images.flatten(1)])
    assert flat.shape == everything.shape
    key = lambda x: np.lexsort(x.numpy().T)  # noqa: E731
    assert torch.equal(flat[key(flat)], everything[key(everything)])
    with pytest.raises(ValueError, match="fold"):
        DataConfig(name="digits", num_folds=5, fold=5)


def test_digits_study_methods_and_make_tables(tmp_path):
    """Two-step digits runs (real data, 2 folds) of every method in the study grid feed make_tables.py."""
    sweep = tmp_path / "sweep"
    methods = _grid("digits_study")["sparsifier"]
    assert {"dense", "dynadiag", "rigl"} <= set(methods)
    methods = ["dense", "dynadiag", "sparse_dynadiag", "rigl"]  # the others: test_sweep_grid_composes, train smoke
    job = 0
    for fold in (0, 1):
        for method in methods:
            overrides = ["+experiment=digits_study", f"sparsifier={method}", f"data.fold={fold}", "sparsity=0.9"]
            overrides += ["trainer.max_steps=2", "trainer.final_inference_iters=1", "backend=reference"]
            overrides += ["++model.depth=1", "data.eval_batch_size=512"]
            cfg = _compose(overrides)
            run_dir = sweep / str(job)
            (run_dir / ".hydra").mkdir(parents=True)
            OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # as Hydra does for every job
            summary = _run(cfg, run_dir)
            assert summary["method"] == method and summary["data"] == "digits"
            job += 1
    out = tmp_path / "tables"
    drawn = make_tables.main([str(sweep), "--out", str(out)])
    runs = make_tables.load_runs([sweep])
    assert len(runs) == 2 * len(methods) and {r["fold"] for r in runs} == {0, 1}
    assert sorted(r["run_dir"] for r in runs) == [f"sweep/{job}" for job in sorted(map(str, range(job)))]
    text = (out / "tables.md").read_text()
    for method in methods:
        assert f"| {method} |" in text
    assert "dynadiag − method" in text and "Throughput" in text and "(CPU time)" in text
    assert str(tmp_path) not in (out / "runs.csv").read_text()  # run directories relative to the output root
    sparse = [m for m in methods if m != "dense"]
    (accuracy,) = drawn["accuracy.png"].values()  # one panel: vit on digits
    assert accuracy == ["dense (± std)", *sparse]
    assert [panel for panel in drawn["throughput.png"].values()] == [["dense", *sparse]] * 2  # training, inference
    (curves,) = drawn["curves.png"].values()
    assert curves == [f"{m} (n=2)" for m in methods]  # one validation curve per method, both folds
    (paired_panel,) = drawn["paired.png"].values()
    assert paired_panel == []  # 2 pairs < MIN_PAIRS: no interval is drawn
    paired = [line for line in (out / "paired.csv").read_text().splitlines()[1:] if ",rigl," in line]
    assert paired and all(",2," in line for line in paired)  # two (seed, fold) pairs per comparison


def test_paired_difference_statistics():
    a = {(0, f): v for f, v in enumerate([90.0, 91.0, 92.0, 93.0])}
    b = {(0, f): v for f, v in enumerate([89.0, 89.5, 91.0, 91.5])}
    d = make_tables.paired_difference(a, b)
    diffs = np.array([1.0, 1.5, 1.0, 1.5])
    assert d["n"] == 4 and d["mean"] == pytest.approx(diffs.mean()) and d["std"] == pytest.approx(diffs.std(ddof=1))
    from scipy.stats import ttest_rel

    assert d["p"] == pytest.approx(ttest_rel(list(a.values()), list(b.values())).pvalue)
    assert d["lo"] > 0  # a consistent +1.25 pp gain: the CI excludes zero
    assert make_tables.paired_difference(a, {(1, 0): 1.0}) is None  # no common (seed, fold)


def test_holm_adjusts_like_the_textbook():
    """Holm (1979): the i-th smallest of m p-values times (m - i), made monotone; NaN is not part of the family."""
    assert make_tables.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = make_tables.holm([math.nan, 0.01, 0.02])
    assert math.isnan(adjusted[0]) and adjusted[1:] == pytest.approx([0.02, 0.02])
    assert make_tables.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert make_tables.holm([]) == []


def test_verdicts_are_family_wise():
    """Two unadjusted p = .021 and .027 among 16 comparisons do not survive Holm: reported as unadjusted only."""
    rows = [
        {"reference": "ours", "method": f"m{i}", "sparsity": 0.9, "mean": 1.0, "std": 1.0, "n": 10}
        | {"lo": 0.1 if p < 0.05 else -0.5, "hi": 2.0, "p": p}
        for i, p in enumerate([0.021, 0.027, 0.0001] + [0.5] * 13)
    ]
    make_tables.add_holm(rows)
    assert [make_tables.verdict(r) for r in rows[:4]] == [
        "ours better (unadjusted only)",
        "ours better (unadjusted only)",
        "ours better",
        "within noise",
    ]
    assert rows[2]["p_holm"] == pytest.approx(16 * 0.0001)
    assert "| Holm p |" in make_tables.markdown_paired(rows)


def test_run_dirs_are_stored_relative_to_the_output_root(tmp_path):
    sweep = tmp_path / "multirun" / "2026-01-01" / "10-00-00"
    assert make_tables.relative_run_dir(sweep / "3", sweep) == "multirun/2026-01-01/10-00-00/3"
    study = tmp_path / "study" / "default"
    (study / "dense-seed0").mkdir(parents=True)
    assert make_tables.relative_run_dir(study / "dense-seed0", study) == "default/dense-seed0"


def test_make_tables_reads_bench_kernels_json(tmp_path):
    records = []
    for s in (0.5, 0.9):
        for method, ms in (("dense_fp32", 1.0), ("cpu_fp32", 1.0 - s + 0.05)):
            rec = {"in": 768, "out": 768, "tokens": 197, "sparsity": s, "achieved_sparsity": s, "method": method}
            rec |= {"fwd_ms": ms, "bwd_ms": 2 * ms, "fb_ms": 3 * ms}
            records.append(rec)
    from scripts.bench_kernels import add_ratios

    add_ratios(records)
    path = tmp_path / "bench_kernels.json"
    path.write_text(json.dumps({"meta": {"device": "cpu"}, "records": records}))
    drawn = make_tables.plot_layer_speedup(path, tmp_path / "layer_speedup.png")
    # fwd and fwd+bwd panels at 197 tokens, one line per method and layer shape
    assert [key.split(" | ")[0] for key in drawn] == ["fwd, 197 tokens (cpu)", "fb, 197 tokens (cpu)"]
    assert list(drawn.values()) == [["cpu_fp32 768->768"]] * 2  # dense is the 1.0 line, not a series


def test_make_tables_reads_its_own_runs_csv(tmp_path):
    """Committed runs.csv files feed make_tables again (their run directories are gone), pairing on (seed, fold)."""
    rows = [
        {"run_dir": f"r{i}", "model": "m", "data": "d", "method": method, "sparsity": 0.9, "seed": 0, "fold": i}
        | {"val_top1_final": acc + i, "val_top1_best": acc + i, "val_top1_last5": acc + i, "sparsity_effective": 0.9}
        | {"train_images_per_s": 10.0, "infer_images_per_s": 20.0, "wall_time_s": 1.0, "device": "cpu"}
        for i in range(3)
        for method, acc in (("dynadiag", 90.0), ("rigl", 91.5))
    ]
    make_tables.write_csv(tmp_path / "runs.csv", rows)
    runs = make_tables.load_runs([tmp_path / "runs.csv"])
    assert [(r["method"], r["fold"], r["val_top1_final"]) for r in runs] == [
        (r["method"], r["fold"], r["val_top1_final"]) for r in rows
    ]
    table = make_tables.Table(runs, "final")
    diff = make_tables.paired_difference(table.values("dynadiag", 0.9), table.values("rigl", 0.9))
    assert diff is not None and diff["n"] == 3 and abs(diff["mean"] + 1.5) < 1e-9


def test_throughput_ratio_uses_cpu_time_when_runs_record_it(tmp_path):
    """The whole-run ratio to dense is computed per (seed, fold) from wall clock and, separately, from CPU time."""
    rows = [
        {"run_dir": f"{m}{i}", "model": "m", "data": "d", "method": m, "sparsity": s, "seed": i, "fold": None}
        | {"val_top1_final": 90.0, "train_images_per_s": 10.0, "train_images_per_s_overall": wall}
        | {"train_images_per_cpu_s_overall": cpu}
        for i in range(2)
        for m, s, wall, cpu in (("dense", 0.0, 100.0, 200.0), ("sparse_dynadiag", 0.9, 150.0, 300.0 + 100 * i))
    ]
    make_tables.write_csv(tmp_path / "runs.csv", rows)
    table = make_tables.Table(make_tables.load_runs([tmp_path / "runs.csv"]), "final")
    (row,) = [r for r in make_tables.throughput_rows(table) if r["method"] == "sparse_dynadiag"]
    assert row["train_overall_vs_dense"] == pytest.approx(1.5)
    assert row["train_overall_cpu_vs_dense"] == pytest.approx(1.75)  # median of 1.5 and 2.0
    assert "(CPU time)" in make_tables.markdown_throughput([row])


def test_make_tables_plots_selection_curves_and_keeps_them_in_csv(tmp_path):
    """Runs with per-epoch selection metrics give selection_history.csv and selection.png; a re-run from the
    committed CSVs (run directories gone) draws the same curves."""
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        for method, share in (("dynadiag", 0.2), ("sparse_dynadiag", 0.9)):
            run_dir = sweep / f"{method}-{seed}"
            run_dir.mkdir(parents=True)
            summary = {"model": "m", "data": "d", "method": method, "sparsity": 0.9, "seed": seed}
            summary |= {"val_top1_final": 90.0 + seed, "val_top1_best": 91.0, "freeze_drop": 0.0}
            (run_dir / "summary.json").write_text(json.dumps(summary))
            records = [
                {"epoch": e, "val/top1": 80.0 + e, "selection/topk_share": share + 0.01 * e}
                | {"selection/live_over_k": 5.0 / e, "selection/churn": 0.1}
                for e in (1, 2, 3)
            ]
            (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "tables"
    drawn = make_tables.main([str(sweep), "--out", str(out)])
    rows = list(csv.DictReader((out / "selection_history.csv").open()))
    assert len(rows) == 2 * 2 * 3 and {r["method"] for r in rows} == {"dynadiag", "sparse_dynadiag"}
    expected = ["dynadiag 90 % (n=2)", "sparse_dynadiag 90 % (n=2)"]
    assert list(drawn["selection.png"].values()) == [expected, expected]  # top-K share, live / K
    again = make_tables.load_runs([out / "runs.csv"])
    by_method = {(r["method"], r["seed"]): r["selection_history"] for r in again}
    assert by_method[("sparse_dynadiag", 1)] == [
        {"epoch": float(e), "topk_share": pytest.approx(0.9 + 0.01 * e), "live_over_k": pytest.approx(5.0 / e)}
        | {"churn": pytest.approx(0.1)}
        for e in (1, 2, 3)
    ]
    (out / "selection.png").unlink()
    again_drawn = make_tables.main([str(out / "runs.csv"), "--out", str(tmp_path / "again")])
    assert again_drawn["selection.png"] == drawn["selection.png"]
