"""Regenerate notebooks/01_batch_noise.ipynb (run from the repository root)."""

from nbtools import write_notebook

CELLS = [
    ("md", """
# 01 · Batch noise: BN vs IEBN (vs no normalisation)

Batch normalisation normalises every sample with statistics of its batch, so each sample's features and
gradient are disturbed by the others in the batch (*batch noise*), and the statistics themselves are random
estimates (*estimation noise*). IEBN (Liang et al., AAAI-20) recalibrates BN's scale per instance and claims to
regulate that noise. This notebook

1. trains BN, IEBN and no-norm ResNets while **injecting noise into the batch statistics** of every normalisation
   layer (`workbench.noise.batch_stat_noise`; kinds: `constant` = the paper's constant attack, `mean` = Gaussian
   noise on the batch mean, `var` = log-normal noise on the batch variance, `both`, `feature`), over noise levels,
   batch sizes and seeds, and evaluates **clean** test accuracy;
2. runs the **mix-dataset attack**: batches mixing the digits with an intensity-shifted copy;
3. measures the noise itself: per-layer **estimation noise** of batch statistics vs batch size, the **gradient
   noise scale** B_simple and **GSNR** over training (micro-batch gradients via `torch.func.vmap`), the **BN
   coupling gap** vs micro-batch size, and how **IEBN's gates** respond to noise.

The `quick` preset (digits at 16×16, ResNet-20 at half width, 3 epochs, 2 seeds, one CPU thread) runs in minutes
on a CPU;
`full` trains ResNet-56 on CIFAR-100 (needs the data on disk and a GPU).
"""),
    ("parameters", """
preset = "quick"
device = "auto"
seed = 0
dataset = None
image_size = None
model = None
width = None
norms = ["bn", "iebn", "none"]
kind = "mean"
levels = None
batch_sizes = None
batch_size = None
seeds = None
mix_seeds = None
epochs = None
mix_epochs = None
lr = 0.1
mix_shift = "invert"
probe_every = None
micro_batches = 4
cpu_threads = None
"""),
    ("code", """
import time

from workbench import report, viz, widgets
from workbench.experiments import batch_noise
from workbench.viz import batch_noise as bnviz

viz.setup()
started = time.perf_counter()
params = batch_noise.resolve(dict(
    preset=preset, device=device, seed=seed, dataset=dataset, image_size=image_size, model=model, width=width,
    norms=norms, kind=kind, levels=levels, batch_sizes=batch_sizes, batch_size=batch_size, seeds=seeds,
    mix_seeds=mix_seeds, epochs=epochs, mix_epochs=mix_epochs, lr=lr, mix_shift=mix_shift, probe_every=probe_every,
    micro_batches=micro_batches, cpu_threads=cpu_threads))
batch_noise.apply_cpu_threads(params)
params
"""),
    ("md", """
## Accuracy under injected batch-statistic noise

Every run trains with noise of the given level in all normalisation layers (training mode only; the running
statistics absorb the clean statistics), then is evaluated on the clean test set. The no-norm network has no
batch statistics: it is trained once per batch size and seed and drawn as a band. The learning rate scales
linearly with the batch size (`lr × batch / 64`). The no-norm network trains with AdamW (lr 0.002, gradient norm
clipped at 1.0; the SGD recipe of the normalised networks leaves it barely trained in this budget). The runs at the reference batch size carry the gradient probes.
"""),
    ("code", """
grid = batch_noise.run_grid(params)
summary = batch_noise.summarize(grid["rows"])
print(f"{len(grid['rows'])} training runs in {grid['seconds']:.0f} s")
viz.show(bnviz.accuracy_vs_level_figure(summary, kind=params["kind"]));
"""),
    ("md", """
Sliders: noise level and batch size pick the nearest grid point (each norm's test accuracy over seeds, and its
training loss). In a batch run the figure for the highest level at the reference batch size is shown.
"""),
    ("code", """
controls = {
    "level": widgets.noise_level_slider(max(params["levels"]), levels=params["levels"]),
    "batch_size": widgets.batch_size_slider(params["batch_size"], options=params["batch_sizes"]),
}
panel = widgets.static_or_interactive(
    controls,
    compute=lambda level, batch_size: batch_noise.slider_view(grid, summary, level, batch_size),
    build=lambda view, level, batch_size: bnviz.accuracy_at_figure(view["point"], level, batch_size, view["losses"]))
"""),
    ("code", """
runs = [{"norm": n, "level": lv, "losses": losses} for (n, lv, bs), losses in grid["losses"].items()
        if bs == params["batch_size"] and n != "none"]
viz.show(bnviz.loss_curves_figure(runs, title=f"Training loss per step under noise (batch {params['batch_size']})"));
"""),
    ("md", """
## The mix-dataset attack

The training set is the digits plus a copy of them shifted in intensity (`mix_shift`: inverted, low contrast or
coloured), labels shared. The attack draws batches that **mix** both sources, so every batch statistic describes a
mixture that fits neither part; the control trains on the very same data for the same number of steps with
**single-source** batches. Accuracy is measured on each source's own test split; the grey bar is the same norm
trained on the digits alone (fewer samples and steps: a reference, not a control).
"""),
    ("code", """
mix_rows = batch_noise.run_mix_attack(params)
mix = batch_noise.summarize_mix(mix_rows, summary, params["batch_size"])
viz.show(bnviz.mix_attack_figure(mix));
"""),
    ("md", """
## Measuring the noise

**Estimation noise** per layer: one eval pass over the training set records every sample's per-channel moments at
each BN input; batches of size B drawn from them give the RMS deviation of the batch mean (in units of the population
standard deviation) and of the batch variance ratio. The dotted line is the 1/√B law of independent samples.
"""),
    ("code", """
diagnostics = batch_noise.run_diagnostics(params, grid["models"])
viz.show(bnviz.estimation_noise_figure(diagnostics["estimation"]));
"""),
    ("md", """
**Gradient noise scale and GSNR over training** (clean runs at the reference batch size): the batch is split into
`micro_batches` micro-batches, each normalised with its own statistics, and their gradients come from one
vectorised pass on a functional copy of the network. B_simple = tr Σ / |G|² (moving averages of both, divided at
read-out), GSNR = mean² / variance per parameter of the micro-batch gradients.
"""),
    ("code", """
viz.show(bnviz.probes_over_training_figure(grid["probes"]));
if "bn" in grid["probes"]:
    viz.show(bnviz.gsnr_layers_figure(grid["probes"]["bn"]["gsnr"], title="Per-layer GSNR over training (BN)"));
"""),
    ("md", """
**BN coupling gap**: the mean of micro-batch gradients (each micro-batch normalised on its own) against the
gradient of the whole batch normalised together. Without batch statistics the two coincide (rounding error);
with BN the gap is the batch noise in the gradient, and it grows as micro-batches shrink.
"""),
    ("code", """
viz.show(bnviz.coupling_gap_figure(diagnostics["coupling"]));
"""),
    ("md", """
**IEBN's response**: mean and spread of the gates per layer, (left) when noise is injected into the clean-trained
IEBN network, (right) for the IEBN networks trained at each level, evaluated on clean inputs.
"""),
    ("code", """
if diagnostics["attention_injected"]:
    viz.show(bnviz.attention_response_figure(diagnostics["attention_injected"], diagnostics["attention_trained"]));
"""),
    ("md", """
## Key numbers

Recorded into the run's `results.json`: per norm the clean accuracy and the accuracy at the highest level (reference
batch size), per-source accuracy under the mix attack, the last B_simple / GSNR readings, the coupling gap at the
smallest micro-batch and the estimation noise at the smallest and largest batch size.
"""),
    ("code", """
result = batch_noise.assemble(params, grid, mix_rows, diagnostics)
numbers = batch_noise.key_numbers(result)
for name, value in batch_noise.flat_numbers(numbers).items():
    report.record(name, value)
report.record("key_numbers", numbers)
report.record("summary", [{k: v for k, v in r.items() if k != "accs"} for r in summary])
report.record("wall_seconds", time.perf_counter() - started)
print(batch_noise.describe(numbers))
print(f"wall time {time.perf_counter() - started:.0f} s on {result['device']}")
"""),
]

if __name__ == "__main__":
    write_notebook("notebooks/01_batch_noise.ipynb", "workbench.experiments.batch_noise", CELLS)
