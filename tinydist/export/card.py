"""The model card (README.md) of an exported folder, from its config.json: recipe, data, metrics,
curves, and how to load and run the model with torchvision and safetensors alone. Its code blocks
are run as written by tests/test_export.py from inside an exported folder.
"""

from __future__ import annotations

from typing import Any

from tinydist.ckpt.layout import index_name

# The export folder's files: the card names them, writer.py writes them.
INDEX = index_name("model")
CONFIG = "config.json"
CARD = "README.md"
CURVES = "curves.png"
STEMS = {"cifar": "3x3 stride-1 conv1, no max-pool", "imagenet": "torchvision's 7x7 stride-2 conv1 + 3x3 max-pool"}

# The card's loading code, run as is by tests/test_export.py from inside an exported folder.
LOAD_CODE = '''\
import json, torch, torchvision
from safetensors.torch import load_file

config = json.load(open("config.json"))
model = torchvision.models.resnet18(num_classes=config["num_classes"])
if config["stem"] == "cifar":  # 3x3 stride-1 conv1 and no max-pool, for small images
    model.conv1, model.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
if config["extra_fc"]:  # Linear(512, n) + ReLU before the classifier
    n = config["extra_fc"]
    model.fc = torch.nn.Sequential(torch.nn.Linear(512, n), torch.nn.ReLU(), torch.nn.Linear(n, config["num_classes"]))
shards = set(json.load(open("model.safetensors.index.json"))["weight_map"].values())
model.load_state_dict({k: v for shard in sorted(shards) for k, v in load_file(shard).items()})
model.eval()
'''

# The card's preprocessing (what `python -m tinydist.predict` does): shorter side to image_size
# (bicubic, antialiased, like the training decode), centre crop, then the training normalisation.
PREDICT_CODE = '''\
from PIL import Image
from torchvision import transforms

size = config["image_size"]
preprocess = transforms.Compose([
    transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(size),
    transforms.ToTensor(), transforms.Normalize(config["mean"], config["std"])])
with torch.no_grad():
    probs = model(preprocess(Image.open("image.jpg").convert("RGB"))[None]).softmax(1)[0]
for p, i in zip(*probs.topk(min(5, len(probs)))):
    print(f"{p:.3f}", config["id2label"][str(int(i))], config["label_names"].get(str(int(i)), ""))
'''


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _metrics_table(provenance: dict[str, Any]) -> list[str]:
    rows = [(f"exported ({provenance.get('weights')} weights, {provenance.get('selected')})",
             provenance.get("step"), provenance.get("metrics") or {})]
    for key in ("final", "best"):
        entry = provenance.get(key)
        if isinstance(entry, dict):
            label = key if key == "final" else f"best by {entry.get('metric', '?')}"
            rows.append((label, entry.get("step"), entry.get("metrics") or {}))
    keys = sorted({k for _, _, m in rows for k in m})
    if not keys:
        return [f"No metrics were recorded with this export (step {provenance.get('step')})."]
    lines = ["| weights | step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    lines += [f"| {label} | {step} | " + " | ".join(_fmt(m.get(k, "")) for k in keys) + " |"
              for label, step, m in rows]
    return lines


def _recipe(train: dict[str, Any]) -> list[str]:
    """The run's config in a few lines (the full resolved config is config.json's `train_config`)."""
    d, m, o, t = train["data"], train["model"], train["optim"], train["train"]
    lines = [
        f"- model: resnet18, `{m['stem']}` stem ({STEMS.get(m['stem'], '?')}), "
        f"{'extra FC ' + str(m['extra_fc']) if m['extra_fc'] else 'no extra FC'}",
        f"- data: `{d['source']}`, train split `{d['train_split']}`, validation split `{d['val_split']}`, "
        f"{d['image_size']}x{d['image_size']} RGB"
        + (f", {d['max_train_samples']} training images" if d.get("max_train_samples") else ""),
        f"- augmentation: random resized crop (scale {d['crop_scale']})" + (", horizontal flips" if d["hflip"] else ""),
        f"- optimiser: {o['name']}, lr {o['lr']} for a global batch of {t['global_batch_size']}, momentum "
        f"{o['momentum']}" + (" (Nesterov)" if o["nesterov"] else "") + f", weight decay {o['weight_decay']}, "
        f"{o['schedule']} schedule with {o['warmup_epochs']} warmup epochs, label smoothing {o['label_smoothing']}",
        f"- length: {t['epochs']} epochs" + (f", capped at {t['max_steps']} steps" if t.get("max_steps") else "")
        + f", seed {t['seed']}",
    ]
    mix, ema = train.get("mix") or {}, train.get("ema") or {}
    if mix.get("mixup_alpha") or mix.get("cutmix_alpha"):
        lines.append(f"- mixing: MixUp alpha {mix['mixup_alpha']}, CutMix alpha {mix['cutmix_alpha']}, "
                     f"probability {mix['prob']}")
    if ema.get("enabled"):
        lines.append(f"- EMA of the weights: decay {ema['decay']}, warm-up power {ema['warmup_power']}")
    return lines


def model_card(config: dict[str, Any], has_curves: bool = False) -> str:
    """README.md of an exported folder, from its config.json."""
    prov, size = config["provenance"], config["image_size"]
    named = len(config["label_names"])
    out = [
        "---", "library_name: pytorch", "tags:", "- image-classification", "- resnet18", "- tinydist", "---", "",
        f"# resnet18 on {config['data_source']}", "",
        f"A torchvision resnet18 ({config['stem']} stem, {config['num_classes']} classes, {size}x{size} inputs) "
        f"trained from scratch with tinydist {config['tinydist_version']}. These are the "
        f"**{prov.get('weights')}** weights, selected as **{prov.get('selected')}**, at step {prov.get('step')}.", "",
        "## Recipe", "", *_recipe(config["train_config"]), "",
        "## Metrics", "", *_metrics_table(prov), "",
    ]
    if has_curves:
        out += ["## Curves", "", f"![training curves]({CURVES})", ""]
    out += [
        "## Load it with torchvision and safetensors", "",
        "From inside this folder (no tinydist needed):", "", "```python", LOAD_CODE.rstrip("\n"), "```", "",
        f"Inputs: RGB, resized so the shorter side is {size} (bicubic, antialiased) and centre-cropped to "
        f"{size}x{size}, scaled to [0, 1], then normalised with `mean` {config['mean']} and `std` {config['std']}:", "",
        "```python", PREDICT_CODE.rstrip("\n"), "```", "",
        "With tinydist installed: `python -m tinydist.predict --model THIS_FOLDER image.jpg [more images or folders]`.", "",
        "## Labels", "",
        "`config.json` maps each output index to its class id in `id2label` (WordNet ids for Tiny ImageNet; "
        "classes are the sorted ids, as tinydist's data loader numbers them) and to a human-readable name in "
        f"`label_names` ({named} of {config['num_classes']} classes have one here).", "",
        "## Files", "",
        f"`{INDEX}` and its shards (the Hugging Face sharded safetensors layout), `{CONFIG}`, this card"
        + (f", `{CURVES}`" if has_curves else "") + f". The index's `metadata.files` holds the size and sha256 of "
        f"each shard and of `{CONFIG}`: tinydist's `evaluate` and `predict` check them before they use the model.",
    ]
    return "\n".join(out) + "\n"
