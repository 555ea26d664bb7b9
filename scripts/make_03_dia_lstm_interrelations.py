"""Regenerate notebooks/03_dia_lstm_interrelations.ipynb (run from the repository root)."""

from nbtools import write_notebook

CELLS = [
    ("md", """
# 03 · DIA-LSTM: how one shared cell ties the layers of a stage together

DIANet shares **one** modified LSTM cell across all residual blocks of a stage. Block *l* feeds the
global-average-pooled output of its residual branch into the cell, which carries its state (c, h) to the
next block; the hidden state `h_l = o ⊙ sigmoid(c_l)` is the block's channel attention. So the attention of
block *l* depends on every earlier block of the stage, where SE (and IEBN) compute each block's attention
independently.

This notebook measures, on the embedded digits:

1. **cross-block correlation** of the attention vectors within a stage, DIA vs SE and IEBN (independent
   per-block attention), and the **ablation** shared LSTM vs independent modules: accuracy, parameters,
   correlation structure;
2. the cell's **gates** (input i, forget f, output o, candidate g) and **states** (c, h) over the blocks;
3. the paper's **stabilisation study**: networks without skip connections, and without BN, each without
   attention, with SE and with DIA: training loss, gradient norm per stage, final accuracy.

`layer` names the stage shown in the detail views (`None`: the middle one).
"""),
    ("parameters", """
preset = "quick"
device = "auto"
seed = 0
model = "resnet20"
norm = "bn"
layer = None
num_samples = 256
"""),
    ("code", """
import ipywidgets

from workbench import report, viz, widgets
from workbench.experiments import dia_interrelations as exp
from workbench.viz import dia as vd

viz.setup()
params = exp.resolve(dict(preset=preset, device=device, seed=seed, model=model, norm=norm, layer=layer,
                          num_samples=num_samples))
params
"""),
    ("md", """
## Shared DIA-LSTM vs independent per-block attention

Three models of the same backbone trained with the same recipe: DIA, SE, and IEBN without extra attention
(its gate on the last BN of each residual branch is compared). Correlation of the attention vectors of two
blocks, two readings:

- **profile**: per test image, the Pearson correlation *over channels* of the two blocks' attention
  (do they favour the same channels?), averaged over images;
- **sample**: per channel, the correlation *over images* (does the channel's attention move with the input
  in both blocks?), averaged over channels.
"""),
    ("code", """
ab = exp.run_ablation(params)
for name, v in ab["variants"].items():
    print(f"{name:20s} test acc {v['test_acc']:.3f}  params {v['params']:7,d}  mean cross-block ρ profile "
          f"{v['mean_corr']:+.3f} (untrained {v['init_mean_corr']:+.3f}), sample {v['mean_corr_sample']:+.3f} "
          f"(untrained {v['init_mean_corr_sample']:+.3f})  {ab['timings'][name]:.0f} s")
"""),
    ("code", """
for mode in ("profile", "sample"):
    viz.show(vd.correlation_matrices_figure({name: c["matrices"][mode] for name, c in ab["correlations"].items()},
                                            title=f"Cross-block correlation of attention ({mode} reading)"))
viz.show(vd.correlation_by_distance_figure({name: c["by_distance"]["profile"] for name, c in ab["correlations"].items()},
                                           title="Mean cross-block correlation (profile) against block distance"))
"""),
    ("code", """
viz.show(vd.ablation_figure({name: {k: v[k] for k in ("test_acc", "params", "mean_corr", "mean_corr_sample")}
                             for name, v in ab["variants"].items()}))
"""),
    ("md", """
## Gates and states of the DIA-LSTM cell

Mean over test images and channels of the gates per block (band: ± std over images and channels), and the
RMS over channels of the cell and hidden state. Below: the same for one image and one channel (or the mean
over channels), chosen with the controls.
"""),
    ("code", """
dia = ab["dia"]
viz.show(vd.gate_curves_figure(dia["gates"], dia["gate_std"]))
viz.show(vd.state_norms_figure(dia["norms"]))
"""),
    ("code", """
states = ab["dia_states"]
stage_w = widgets.dropdown(list(states), params["layer"], "stage")
sample_w = ipywidgets.IntSlider(value=0, min=0, max=params["num_samples"] - 1, description="sample", continuous_update=False)
channel_w = ipywidgets.IntSlider(value=-1, min=-1, max=0, description="channel (-1: mean)", continuous_update=False)
# The channel range follows the chosen stage (16, 32 or 64 channels in resnet20).
widgets.bind_range(channel_w, stage_w, lambda stage: (-1, states[stage][0]["h"].shape[1] - 1))

def compute_gates(stage, sample, channel):
    return exp.gate_curves_for(states, stage, sample, channel)

def build_gates(curves, stage, sample, channel):
    what = "mean over channels" if channel < 0 else f"channel {channel}"
    return vd.gate_curves_figure({stage: curves}, title=f"DIA-LSTM gates and h in {stage}, image {sample}, {what}")

widgets.static_or_interactive({"stage": stage_w, "sample": sample_w, "channel": channel_w}, compute_gates, build_gates)
"""),
    ("md", """
## Stabilisation: no skip connections, no BN

The DIANet paper reports that DIA-LSTM keeps residual networks trainable when the skip connections or all
BN layers are removed. Here each condition is trained without attention, with SE and with DIA, same recipe
and seed. A run whose loss becomes NaN/inf is stopped and marked diverged.
"""),
    ("code", """
stab = exp.run_stabilisation(params)
for cond, per in stab["runs"].items():
    for att, r in per.items():
        status = "DIVERGED" if r["diverged"] else "ok"
        print(f"{cond:8s} {att:5s} test acc {r['test_acc']:.3f}  final train loss "
              f"{(r['epoch_loss'] or [float('nan')])[-1]:.3f}  {status}  ({r['train_seconds']:.0f} s)")
"""),
    ("code", """
viz.show(vd.stabilisation_curves_figure({c: {a: r["step_loss"] for a, r in per.items()} for c, per in stab["runs"].items()},
                                        x={c: {a: r["steps"] for a, r in per.items()} for c, per in stab["runs"].items()},
                                        x_title="step", title="Training loss per step without skip connections / without BN"))
for cond, per in stab["runs"].items():
    viz.show(vd.grad_norm_figure({a: r["grad_norms"] for a, r in per.items()},
                                 steps=next(iter(per.values()))["steps"],
                                 title=f"Gradient norm per stage, {cond}"))
viz.show(vd.final_accuracy_figure(stab["final_acc"], title="Final test accuracy, stabilisation study"))
"""),
    ("code", """
report.record("mean_cross_layer_corr", {name: v["mean_corr"] for name, v in ab["variants"].items()})
report.record("mean_cross_layer_corr_sample", {name: v["mean_corr_sample"] for name, v in ab["variants"].items()})
report.record("untrained_mean_cross_layer_corr", {name: v["init_mean_corr"] for name, v in ab["variants"].items()})
report.record("untrained_mean_cross_layer_corr_sample", {name: v["init_mean_corr_sample"] for name, v in ab["variants"].items()})
report.record("ablation_test_acc", {name: v["test_acc"] for name, v in ab["variants"].items()})
report.record("ablation_params", {name: v["params"] for name, v in ab["variants"].items()})
report.record("stabilisation_test_acc", stab["final_acc"])
report.record("stabilisation_diverged", {c: {a: bool(r["diverged"]) for a, r in per.items()} for c, per in stab["runs"].items()})
report.record("stabilisation_final_train_loss", {c: {a: (r["epoch_loss"] or [None])[-1] for a, r in per.items()}
                                                 for c, per in stab["runs"].items()})
report.record("stabilisation_grad_norm_last", {c: {a: {s: v[-1] for s, v in r["grad_norms"].items()}
                                                              for a, r in per.items()} for c, per in stab["runs"].items()})
report.recorded()
"""),
    ("md", """
## What the numbers say

Built from this run's measurements (one seed, short training: differences of a few points are noise).
"""),
    ("code", """
for line in exp.summary_lines(ab, stab):
    print("-", line)
"""),
]

if __name__ == "__main__":
    write_notebook("notebooks/03_dia_lstm_interrelations.ipynb", "workbench.experiments.dia_interrelations", CELLS)
