"""Regenerate notebooks/02_attention_weights.ipynb (run from the repository root)."""

from nbtools import write_notebook

CELLS = [
    ("md", """
# 02 · Attention weights: IEBN gates, SE excitations, DIA attention per channel

Every attention site of a network scales its channels by a per-sample vector in (0, 1): IEBN's gate
`a = sigmoid(ŵ·GAP(x) + b̂)` inside each normalisation layer, SE's excitation on each residual branch,
DIA-LSTM's hidden state `h` on each residual branch. This notebook trains one small ResNet on the
embedded digits and records those vectors on the test split (hooks that see exactly what the forward
used and do not change it), then asks:

1. how attention is distributed over **layers, channels, samples and classes**;
2. how much it **shifts when batch-statistic noise** is injected into the normalisation layers;
3. whether it ranks channels the way **captum attributions** do (LayerGradCam per channel,
   LayerConductance), as a Spearman rank correlation per layer.

By default the model has IEBN (every BN is an IEBN) *and* DIA, so two kinds of attention appear side
by side; set `attention = "se"` for SE, `norm = "bn"` to drop IEBN. `layer` picks the site shown in the
detail views (`None`: one in the middle of the network); a name that does not exist lists the ones that do.
"""),
    ("parameters", """
preset = "quick"
device = "auto"
seed = 0
model = "resnet20"
norm = "iebn"
attention = "dia"
layer = None
num_samples = 256
"""),
    ("code", """
import ipywidgets

from workbench import report, viz, widgets
from workbench.experiments import attention as exp
from workbench.viz import attention as va

viz.setup()
params = exp.resolve(dict(preset=preset, device=device, seed=seed, model=model, norm=norm, attention=attention,
                          layer=layer, num_samples=num_samples))
params
"""),
    ("code", """
result = exp.run_attention_study(**params)
train, stats, views = result["train"], result["stats"], result["views"]
sites, classes = stats.layers, views["classes"]
print(f"{params['model']} norm={params['norm']} attention={params['attention']}: {train['params']:,} parameters, "
      f"test accuracy {train['test_acc']:.2%} after {params['epochs']} epochs on {train['device']}")
print(f"{len(sites)} attention sites ({', '.join(f'{k}: {list(stats.kinds.values()).count(k)}' for k in sorted(set(stats.kinds.values())))}), "
      f"statistics over {stats.count} test samples")
print("seconds:", {k: round(v, 1) for k, v in result["timings"].items()})
"""),
    ("code", """
viz.show(viz.training_curves_figure({f"{params['model']} {params['norm']}/{params['attention']}": train["history"]},
                                    title="Training curves of the model whose attention is examined"))
"""),
    ("md", """
## Attention per layer and channel

Mean attention over the test samples. Sorting each layer's channels by their mean (second figure) shows
how peaked each layer's attention is, whichever channels carry it. IEBN gates start at sigmoid(-1) ≈ 0.269
for every channel and spread during training.
"""),
    ("code", """
viz.show(va.attention_heatmap_figure(views["means"]))
viz.show(va.attention_heatmap_figure(views["means"], sort_channels=True,
                                     title="Mean attention per layer, channels sorted by their mean"))
"""),
    ("code", """
viz.show(va.attention_distribution_figure(views["samples"], kinds=views["kinds"], style="violin"))
kinds = sorted(set(views["kinds"].values()))
spread_by_kind = {k: {s: views["spread"][s] for s in sites if views["kinds"][s] == k} for k in kinds}
channel_spread_by_kind = {k: {s: views["channel_spread"][s] for s in sites if views["kinds"][s] == k} for k in kinds}
viz.show(va.attention_spread_figure(spread_by_kind))
viz.show(va.attention_spread_figure(channel_spread_by_kind,
                                    title="Attention spread across channels per layer (std of the channel means)"))
"""),
    ("md", """
## By class, by channel, by sample

Pick a layer, a channel and a sample. Class-conditional attention is shown relative to each channel's
mean over classes (blue: the class turns the channel up, red: down). In a batch run the figures are static, for
the `layer` parameter.
"""),
    ("code", """
def compute_class(layer):
    return stats.class_mean[layer].tolist()

def build_class(rows, layer):
    return va.class_attention_figure(rows, classes, center=True, layer=layer)

widgets.static_or_interactive({"layer": widgets.dropdown(sites, params["layer"], "layer")}, compute_class, build_class)
"""),
    ("code", """
layer_w = widgets.dropdown(sites, params["layer"], "layer")
channel_w = ipywidgets.IntSlider(value=0, min=0, max=stats.mean[params["layer"]].numel() - 1, description="channel",
                                 continuous_update=False)
layer_w.observe(lambda change: setattr(channel_w, "max", stats.mean[change["new"]].numel() - 1), names="value")

def compute_channel(layer, channel):
    return exp.channel_values_by_class(stats, layer, min(channel, stats.mean[layer].numel() - 1), classes)

def build_channel(values, layer, channel):
    return va.channel_attention_figure(values, layer=layer, channel=min(channel, stats.mean[layer].numel() - 1))

widgets.static_or_interactive({"layer": layer_w, "channel": channel_w}, compute_channel, build_channel)
"""),
    ("code", """
sample_w = ipywidgets.IntSlider(value=0, min=0, max=stats.count - 1 if stats.sample_targets is None
                                else len(stats.sample_targets) - 1, description="sample", continuous_update=False)

def compute_sample(layer, sample):
    q = stats.quantiles[layer]
    return dict(sample=stats.samples[layer][sample].tolist(), mean=stats.mean[layer].tolist(),
                low=q[0].tolist(), high=q[-1].tolist(), label=f"sample {sample} (class {classes[int(stats.sample_targets[sample])]})")

def build_sample(data, layer, sample):
    return va.sample_attention_figure(data["sample"], data["mean"], data["low"], data["high"], layer=layer,
                                      label=data["label"])

widgets.static_or_interactive({"layer": widgets.dropdown(sites, params["layer"], "layer"), "sample": sample_w},
                              compute_sample, build_sample)
"""),
    ("md", """
## Shift under injected batch-statistic noise

Training-mode forwards of the same test batch, clean and with Gaussian noise on every normalisation
layer's batch mean (`workbench.noise.batch_stat_noise`, kind `"mean"`: μ̃ = μ_B + level·σ_B·ξ), on a copy of
the trained model (its running statistics are untouched). Shown: the mean absolute change of each
site's attention against the clean forward.
"""),
    ("code", """
noise = result["noise"]
viz.show(va.attention_noise_shift_figure(noise["levels"], noise["shift"]))
"""),
    ("md", """
## Attention vs captum attributions

Per site, channel importance from captum at the feature map the attention scales (the IEBN layer's
output, the SE/DIA-gated residual branch): LayerGradCam per channel (`attr_dim_summation=False`, spatial
mean) and LayerConductance from a black image, both towards the true class, as the mean over samples of
the absolute per-sample value. ρ is the Spearman rank correlation between that importance and the mean
attention of the channels.
"""),
    ("code", """
agreement = result["agreement"]
viz.show(va.attribution_correlation_figure(agreement["rho"]))

def compute_attr(layer):
    return dict(attention=agreement["attention"][layer], attribution={m: agreement["importance"][m][layer]
                                                                      for m in agreement["importance"]})

def build_attr(data, layer):
    return va.attribution_scatter_figure(data["attention"], data["attribution"], layer=layer)

attr_sites = agreement["sites"]
widgets.static_or_interactive({"layer": widgets.dropdown(attr_sites, params["layer"] if params["layer"] in attr_sites
                                                         else attr_sites[0], "layer")}, compute_attr, build_attr)
"""),
    ("code", """
report.record("test_acc", train["test_acc"])
report.record("params", train["params"])
report.record("attention_spread", views["spread"])
report.record("attention_spread_mean", {k: sum(v.values()) / len(v) for k, v in spread_by_kind.items()})
report.record("attention_channel_spread", views["channel_spread"])
report.record("attention_channel_spread_mean", {k: sum(v.values()) / len(v) for k, v in channel_spread_by_kind.items()})
report.record("attribution_rank_correlation", agreement["rho"])
report.record("attribution_rank_correlation_mean", agreement["mean_rho"])
report.record("noise_shift_mean", {f"{lv:g}": sum(s[i] for s in noise["shift"].values()) / len(noise["shift"])
                                   for i, lv in enumerate(noise["levels"])})
report.record("seconds", result["timings"])
{k: v for k, v in report.recorded().items() if k.endswith("_mean") or k in ("test_acc", "params")}
"""),
]

if __name__ == "__main__":
    write_notebook("notebooks/02_attention_weights.ipynb", "workbench.experiments.attention", CELLS)
