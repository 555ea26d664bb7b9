"""Regenerate notebooks/04_pruning_sparsity.ipynb (run from the scripts/ folder)."""

from nbtools import write_notebook

CELLS = [
    ("md", """
# 04 · BN-scale sparsity and context-aware pruning (CAP)

Network Slimming prunes the channels whose BN scale |γ| is small after training with an L1 penalty on the
scales; CAP (He et al., WACV 2021) guides that penalty with channel context (CAGM builds a C×C channel-affinity
matrix from each BN site's feature and reduces it to a per-channel guiding vector; CAGS weights the penalty by
it, so contextually important channels are penalised less). The same segmentation network is trained on the
embedded `digit-scenes` three ways — **plain**, **L1** (slimming) and **CAGS** (CAP) — then pruned for real
with Torch-Pruning (channels removed, not masked) at several ratios, and fine-tuned.

The exact CAGM affinity and CAGS loss are not published; the choices made are documented in
`workbench.pruning` and are parameters. Whether CAP keeps more mIoU than slimming at the same ratio is
measured here, not assumed.
"""),
    ("parameters", """
preset = "quick"
device = "auto"
seed = 0
model = "pspnet_resnet18"
norm = "bn"
ratio = 0.5
ratios = None
lam = None
width = None
epochs = None
finetune_epochs = None
batch_size = None
lr = None
optimizer = None
bn_init = None
sparsity_mode = None
"""),
    ("code", """
import time

from workbench import report, viz, widgets
from workbench.experiments import pruning
from workbench.viz import pruning as pviz

viz.setup()
started = time.perf_counter()
params = pruning.resolve(dict(preset=preset, device=device, seed=seed, model=model, norm=norm, ratio=ratio,
                              ratios=ratios, lam=lam, width=width, epochs=epochs, finetune_epochs=finetune_epochs,
                              batch_size=batch_size, lr=lr, optimizer=optimizer, bn_init=bn_init,
                              sparsity_mode=sparsity_mode))
params
"""),
    ("md", """
## Sparsity training: plain vs L1 vs CAGS

Every BN's |γ| is recorded before training and after each epoch. Drag the slider under the histogram to move
through the epochs.
"""),
    ("code", """
runs = pruning.run_sparsity(**params, progress=True)
for regime, run in runs.items():
    print(f"{regime:>5}: test mIoU {run['miou']:.3f}, |gamma| < 1e-2: {run['fraction_below'][1e-2]:.1%}, "
          f"{run['train_seconds']:.0f} s")
"""),
    ("code", """
for regime, run in runs.items():
    viz.show(pviz.scale_histogram_figure(run["scale_records"], title=f"|gamma| over epochs, {regime} training"))
"""),
    ("code", """
viz.show(pviz.scale_heatmap_figure(runs["cags"]["scale_records"], title="CAGS: distribution of |gamma| per epoch"))
viz.show(pviz.sparsity_curves_figure(pruning.sparsity_curves(runs), threshold=1e-2))
"""),
    ("md", """
## Pruning and fine-tuning: slimming (from the L1 run) vs CAP (from the CAGS run)

At each ratio the global threshold on channel importance removes that share of the prunable channels (with a
floor of one channel per layer; classifier and auxiliary heads keep their class count). Params and FLOPs are
counted on the physically smaller network (`torch.utils.flop_counter`), latency is measured on the current
device at batch 8, and the pruned network is fine-tuned with the same schedule for both methods.
"""),
    ("code", """
rows = pruning.prune_sweep(runs, params["ratios"], **{k: v for k, v in params.items() if k != "ratios"},
                           progress=True, keep_models=True)
viz.show(pviz.tradeoff_figure(rows, title="mIoU, params, FLOPs and latency against the prune ratio"))
"""),
    ("md", """
Slider: the prune ratio. The kept channels per layer for each method at that ratio.
"""),
    ("code", """
by_ratio = {}
for row in rows:
    by_ratio.setdefault(round(row["ratio"], 4), {})[row["method"]] = row["layers"]
panel = widgets.static_or_interactive(
    {"ratio": widgets.prune_ratio_slider(params["ratio"], options=sorted(by_ratio))},
    compute=lambda ratio: by_ratio[round(ratio, 4)],
    build=lambda layers, ratio: pviz.kept_channels_figure(layers, title=f"channels kept per layer at ratio {ratio}"))
"""),
    ("md", """
## Predicted masks

Test scenes with their true masks and the predictions of the unpruned L1 / CAGS networks and of the pruned +
fine-tuned ones at the chosen ratio.
"""),
    ("code", """
models = {f"{regime} (unpruned)": run["model"] for regime, run in runs.items() if regime != "plain"}
for row in rows:
    if abs(row["ratio"] - params["ratio"]) < 1e-9 and row.get("model") is not None:
        models[f"{row['method']} pruned {row['ratio']:.0%} + fine-tuned"] = row["model"]
samples = pruning.sample_predictions(models, num_samples=4, device=params["device"])
viz.show(pviz.predictions_figure(samples))
"""),
    ("code", """
numbers = pruning.key_numbers(runs, rows, params["ratio"])
for name, value in numbers.items():
    report.record(name, value)
report.record("sweep", [{k: r[k] for k in ("method", "ratio", "params_reduction", "flops_reduction",
                                          "miou_pruned", "miou_finetuned")} for r in rows])
report.record("wall_seconds", time.perf_counter() - started)
numbers
"""),
]

if __name__ == "__main__":
    write_notebook("notebooks/04_pruning_sparsity.ipynb", "workbench.experiments.pruning", CELLS)
