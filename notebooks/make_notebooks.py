"""The one source of the three notebooks: their cells are written here, and
`python notebooks/make_notebooks.py` writes the .ipynb files, without outputs. Edit the cells here, not the
.ipynb files: the test suite checks that the committed notebooks are exactly what this file writes, and runs them.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

VIT_TUTORIAL = [
    ("md", """# A Vision Transformer, piece by piece

This notebook builds the ViT of `vitlab.models.vit` one module at a time on real CIFAR-10 images and
prints the tensor shapes at each step: patch embedding, position embedding, CLS token, multi-head
self-attention, a pre-norm block, the whole model, and a short training run.

CIFAR-10 is read from `$VITLAB_DATA` (or `./data`, downloaded when missing)."""),
    ("code", """import torch

from vitlab.data import CLASSES, load_cifar10, normalize
from vitlab.models.vit import Attention, Block, PatchEmbedding, VisionTransformer, ViTConfig, sincos_position_embedding

torch.manual_seed(0)
data = load_cifar10(subset=2000, test_subset=1000)  # 1,600 training, 400 validation, 1,000 test images
images = normalize(data.train_images[:8])  # uint8 (8, 3, 32, 32) -> standardised float
print("images", tuple(images.shape), "labels", [CLASSES[i] for i in data.train_labels[:8]])"""),
    ("md", """## 1. Patches → tokens
A patch of 4×4 pixels × 3 colours = 48 numbers is mapped linearly to `hidden_size` numbers. A
convolution with kernel = stride = patch size is exactly that linear map applied to every patch."""),
    ("code", """config = ViTConfig(patch_size=4, hidden_size=64, num_heads=4, num_blocks=4)
embed = PatchEmbedding(config)
tokens = embed(images)
print("grid", config.grid_size, "x", config.grid_size, "->", config.num_patches, "patches")
print("patch tokens", tuple(tokens.shape), "= (batch, patches, hidden)")"""),
    ("md", """Patch sizes that do not divide 32 (the seeds' study uses 6) pad the image symmetrically, so no pixel is lost:"""),
    ("code", """six = ViTConfig(patch_size=6)
print("patch 6: padding", PatchEmbedding(six).padding, "->", six.grid_size, "x", six.grid_size, "grid,",
      tuple(PatchEmbedding(six)(images).shape))"""),
    ("md", """## 2. Where each patch is: position embeddings, and the CLS token
Attention is blind to order, so each token gets a position vector added: learned, or fixed 2-D sine-cosine."""),
    ("code", """positions = sincos_position_embedding(config.grid_size, config.hidden_size)
print("sin-cos table", tuple(positions.shape))
tokens = tokens + positions
cls = torch.zeros(len(images), 1, config.hidden_size)  # a learned parameter in the model
tokens = torch.cat([cls, tokens], dim=1)
print("with CLS", tuple(tokens.shape), "= (batch, 1 + patches, hidden)")"""),
    ("md", """## 3. Multi-head self-attention
Each head compares every token with every other (softmax(QKᵀ/√d)), so its weights are a
(tokens × tokens) matrix whose rows sum to 1."""),
    ("code", """attention = Attention(config)
mixed, weights = attention(tokens, return_attention=True)
print("output", tuple(mixed.shape), "weights", tuple(weights.shape), "= (batch, heads, tokens, tokens)")
print("rows sum to 1:", torch.allclose(weights.sum(-1), torch.ones(())))"""),
    ("md", """## 4. A pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))"""),
    ("code", """block = Block(config)
out, _ = block(tokens)
print("block keeps the shape:", tuple(out.shape))
print("MLP:", block.mlp)"""),
    ("md", """## 5. The whole model
Blocks, a final LayerNorm, the CLS token read out (or the mean of the tokens with `pool='mean'`), a linear head."""),
    ("code", """model = VisionTransformer(config)
logits, maps = model(images, return_attention=True)
print("logits", tuple(logits.shape), "|", len(maps), "attention maps of", tuple(maps[0].shape))
print(f"{model.num_parameters:,} parameters")
print("fast path (fused attention) gives the same logits:", torch.allclose(model(images), logits, atol=1e-5))"""),
    ("md", """## 6. Train it for a moment
The `Runner` trains on device-resident data with batched augmentation; two epochs on 1,600 images
only show that it learns — `vitlab train --preset vit-seed001` is the real thing."""),
    ("code", """from vitlab.config import TrainConfig
from vitlab.train.trainer import Runner

runner = Runner(model, TrainConfig(epochs=2, batch_size=64, progress=False))
for record in runner.fit(data):
    print(f"epoch {record['epoch']}: train loss {record['train_loss']:.3f}, validation accuracy {record['val_acc']:.1f}%")
print(f"test accuracy {runner.evaluate(data.test_images, data.test_labels).accuracy:.1f}% (chance: 10%)")"""),
]

ATTENTION_MAPS = [
    ("md", """# What does the ViT look at? Attention maps and rollout

Set `VITLAB_RUN` to a ViT run folder (from `vitlab train --model vit ...`) to look at a trained model;
without it, this notebook trains a small ViT for a minute first. The command-line version is
`vitlab attention RUN_DIR`."""),
    ("code", """import os
import tempfile
from pathlib import Path

import torch
from IPython.display import Image, display

from vitlab.data import CLASSES, load_cifar10, normalize
from vitlab.inspect.attention import attention_stack, mean_attention_distance, patch_scores, rollout, to_image_grid
from vitlab.inspect.images import test_images
from vitlab.models import VisionTransformer

run = os.environ.get("VITLAB_RUN")
if run:
    model = VisionTransformer.load(run)
else:
    from vitlab.config import TrainConfig
    from vitlab.models import build_model
    from vitlab.train.trainer import Runner

    torch.manual_seed(0)
    model = build_model("vit", patch_size=4, hidden_size=64, num_heads=4, num_blocks=4)
    Runner(model, TrainConfig(epochs=2, batch_size=64, progress=False)).fit(load_cifar10(subset=2500, test_subset=100))
print(model.config)"""),
    ("md", """## Raw attention, layer by layer
`attention_stack` runs the model's explicit attention path and returns every layer's weights:
(layers, batch, heads, tokens, tokens). The model's `token_layout()` says where the tokens sit on the image:
token 0 is the CLS token for `pool='cls'`, then the patches in row-major order."""),
    ("code", """images = test_images(4)
logits, attention = attention_stack(model, normalize(images.images).to(next(model.parameters()).device))
print("attention", tuple(attention.shape))
layout = model.token_layout()
print(layout)
first_layer = to_image_grid(patch_scores(attention[0].mean(dim=1), layout), layout, 32)  # (batch, 32, 32)
print("layer-1 CLS->patch map over the image", tuple(first_layer.shape))
for i in range(len(images.images)):
    print(images.names[i], "true", images.true_name(i), "| predicted", CLASSES[int(logits[i].argmax())])"""),
    ("md", """## Attention rollout (Abnar & Zuidema 2020)
Average the heads, add the identity for the residual connection, renormalise the rows, multiply
through the layers. Row 0 then says how much each patch flows into the CLS token at the end."""),
    ("code", """flow = rollout(attention)  # (batch, tokens, tokens)
print("rollout", tuple(flow.shape), "rows sum to 1:", torch.allclose(flow.sum(-1), torch.ones(())))
maps = to_image_grid(patch_scores(flow, layout), layout, 32)
print("share of the flow on the central 16x16 pixels:", [f"{float(m[8:24, 8:24].sum() / m.sum()):.2f}" for m in maps])"""),
    ("md", """## The figures `vitlab attention` writes"""),
    ("code", """from vitlab.inspect.figures import attention_distance_plot, attention_grid

out = Path(tempfile.mkdtemp())
for path in attention_grid(model, images, out, method="raw", head="mean")[:2]:
    display(Image(filename=str(path)))
display(Image(filename=str(attention_distance_plot(model, test_images(64).images, out / "distance.png"))))
print("mean attention distance (pixels) per layer:", mean_attention_distance(attention, layout).mean(dim=1).tolist())"""),
]

MODEL_COMPARISON = [
    ("md", """# CNN vs ViT: a study with confidence intervals

Set `VITLAB_STUDY` to a study folder from `vitlab compare` (for example the README's CPU study);
without it, this notebook runs a tiny study (1,500 images, 2 epochs, 3 seeds) so it finishes in a
few minutes. The numbers of a tiny study are only a demonstration.

Each Δ in the table has a *seed-aware* interval: it accounts for the noise of training seeds and of
the test set (`vitlab.study.stats`)."""),
    ("code", """import os
import tempfile

from IPython.display import Image, Markdown, display

from vitlab.study.execute import run_study
from vitlab.study.plan import StudyPlan
from vitlab.study.summary import summarize_study

study = os.environ.get("VITLAB_STUDY")
if not study:
    study = tempfile.mkdtemp() + "/tiny-study"
    plan = StudyPlan(specs=["cnn-small", "vit:patch_size=4", "vit:patch_size=8"],
                     budget={"subset": 1500, "test_subset": 1000, "epochs": 2, "progress": False}, seeds=[0, 1, 2])
    run_study(plan, study)
summary = summarize_study(study)
display(Markdown(summary.markdown_table()))"""),
    ("md", """## Per seed: the paired bootstrap and McNemar's test
Per seed, both trained networks are scored on the *same* resampled test images. This answers "do
these two networks differ on this test set?", not "do these two configurations differ?": a second
seed can land elsewhere, which is why the table's interval also includes the seed-to-seed spread."""),
    ("code", """from pathlib import Path

from vitlab.rundir import RunDir
from vitlab.study.plan import parse_spec
from vitlab.study.stats import mcnemar, paired_bootstrap


def correct(spec, seed):
    record = RunDir(Path(study) / "runs" / parse_spec(spec).slug / f"seed{seed}").predictions()
    return record["predictions"] == record["labels"]

baseline, other = summary.rows[0], summary.rows[1]
for seed in other.seeds:
    a, b = correct(other.spec, seed), correct(baseline.spec, seed)
    difference = paired_bootstrap(a, b, resamples=5000)
    test = mcnemar(a, b)
    print(f"seed {seed}: {other.spec} - {baseline.spec} = {difference.observed:+.2f} points "
          f"[{difference.ci_low:+.2f}, {difference.ci_high:+.2f}]; McNemar {test.only_a_right} vs {test.only_b_right}, p = {test.p_value:.3g}")"""),
    ("md", """## Figures"""),
    ("code", """for name in ("differences.png", "curves.png", "accuracy_vs_patch_size.png", "accuracy_vs_time.png"):
    path = Path(study) / "figures" / name
    if path.exists():
        display(Image(filename=str(path)))"""),
]


def build(cells) -> nbformat.NotebookNode:
    notebook = new_notebook(cells=[new_markdown_cell(text) if kind == "md" else new_code_cell(text) for kind, text in cells])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    return notebook


NOTEBOOKS = {"vit_tutorial": VIT_TUTORIAL, "attention_maps": ATTENTION_MAPS, "model_comparison": MODEL_COMPARISON}


def notebook_text(cells) -> str:
    """The .ipynb file's exact text for these cells (cell ids derived from the content, so it is reproducible)."""
    notebook = build(cells)
    for index, cell in enumerate(notebook.cells):
        cell["id"] = f"cell-{index:02d}"
    return nbformat.writes(notebook) + "\n"


if __name__ == "__main__":
    for name, cells in NOTEBOOKS.items():
        (HERE / f"{name}.ipynb").write_text(notebook_text(cells))
        print(f"wrote notebooks/{name}.ipynb")
