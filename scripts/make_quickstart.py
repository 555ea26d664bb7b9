"""Regenerate notebooks/00_quickstart.ipynb (run from the repository root)."""

from nbtools import write_notebook

CELLS = [
    ("md", """
# 00 · Quickstart: a CIFAR-style ResNet on the embedded digits

Trains a small ResNet (BatchNorm by default) on scikit-learn's 1,797 handwritten digits, upsampled to
32×32×3 — real data that ships with the workbench, so nothing is downloaded. Shows the training curves
and the confusion matrix, and records the test accuracy into the run's `results.json`.
Change `norm` to `"iebn"` or `attention` to `"se"`/`"dia"` to try the other layers. Left at `None`, the
optimiser, learning rate and gradient clipping follow the norm: SGD at lr 0.1 with normalisation (the papers'
recipe), AdamW at lr 0.002 with the gradient norm clipped at 1.0 without it (`norm = "none"`: SGD does not train the
un-normalised ResNet in the quick preset's 15 epochs; see `quickstart.default_recipe`).
"""),
    ("parameters", """
preset = "quick"
device = "auto"
seed = 0
model = "resnet20"
norm = "bn"
attention = "none"
width = 1.0
epochs = None
batch_size = 64
optimizer = None
lr = None
grad_clip = None
"""),
    ("code", """
from workbench import report, viz
from workbench.experiments import quickstart

viz.setup()
params = quickstart.resolve(dict(preset=preset, device=device, seed=seed, model=model, norm=norm,
                                 attention=attention, width=width, epochs=epochs, batch_size=batch_size,
                                 optimizer=optimizer, lr=lr, grad_clip=grad_clip))
params
"""),
    ("code", """
result = quickstart.run_quickstart(**params)
print(f"{params['model']} ({result['params']:,} parameters) on {result['device']}: "
      f"test accuracy {result['test_acc']:.2%} after {params['epochs']} epochs in {result['train_seconds']:.0f} s")
"""),
    ("code", """
viz.show(viz.training_curves_figure({f"{params['model']} / {params['norm']}": result["history"]},
                                    title="Loss and accuracy per epoch (train dashed, test solid)"))
"""),
    ("code", """
viz.show(viz.confusion_matrix_figure(result["confusion"], result["classes"], title="Test confusion matrix"))
"""),
    ("code", """
report.record("test_acc", result["test_acc"])
report.record("test_loss", result["test_loss"])
report.record("params", result["params"])
report.record("epochs", params["epochs"])
report.record("optimizer", params["optimizer"])
report.record("lr", params["lr"])
report.record("train_seconds", result["train_seconds"])
report.record("final_train_loss", result["history"][-1]["train_loss"])
"""),
]

if __name__ == "__main__":
    write_notebook("notebooks/00_quickstart.ipynb", "workbench.experiments.quickstart", CELLS)
