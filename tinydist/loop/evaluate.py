"""Top-1 / top-5 / loss of a model on a split (`evaluate`; `Evaluator`: as a run's config sets it), and
`python -m tinydist.evaluate`.

    python -m tinydist.evaluate --checkpoint runs/x/checkpoints/step-00001000 [--config FILE] [--data.source=...]
    python -m tinydist.evaluate --checkpoint runs/x/model [--split train] [--json]

The command's metrics are named after the split scored: `val/top1`, `val/top5`, `val/loss` for the
run's data.val_split (training's own names), `train/top1` ... for `--split train`; its JSON also
holds `split` and `images`. Exit codes as every entry point (runtime/cli.py): a checkpoint that is not there
or does not fit is 2, storage or the hub out of reach 69.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from tinydist.config import Config
from tinydist.data.augment import eval_transform, inference_channels_last, to_device
from tinydist.data.cache import ImageCache
from tinydist.data.sampler import eval_shard


@torch.no_grad()
def evaluate(model: torch.nn.Module, cache: ImageCache, batch_size: int, device: torch.device,
             world_size: int = 1, rank: int = 0, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
             channels_last: bool = True, autocast: Any = None, flip: bool = False,
             prefix: str = "val", also: Optional[Mapping[str, torch.nn.Module]] = None) -> dict[str, float]:
    """Each rank scores a disjoint slice; sums are reduced, so every image counts exactly once.
    `model` must be the bare module: a DDP forward is a collective and ranks may hold uneven batches.
    With `flip`, the mirrored images are scored too and the averaged logits reported as
    `{prefix}/top1_flip` (and top5_flip), beside the plain metrics, so curves stay comparable.
    `also` ({prefix: module}, e.g. the EMA's as `val_ema`): more models scored on the same batches, in
    the same pass: each batch is gathered and transformed once, whatever the number of models, and one
    all-reduce carries every model's sums. Each model's metrics are those a pass of its own gives."""
    models = {prefix: model, **(also or {})}
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    k = min(5, len(cache.classes))
    # Per model: loss, top1, top5, count, top1_flip, top5_flip
    totals = torch.zeros(len(models), 6, dtype=torch.float64, device=device)
    channels_last = inference_channels_last(channels_last, device)
    for indices in eval_shard(len(cache), batch_size, world_size, rank):
        images, labels = to_device(cache.gather(indices), cache.labels[indices], device)
        inputs = eval_transform(images, channels_last)
        mirrored_inputs = inputs.flip(3) if flip else None
        for row, m in enumerate(models.values()):
            totals[row] += _batch_sums(m, inputs, mirrored_inputs, labels, k, device, autocast)
    if reduce is not None:
        totals = reduce(totals)
    metrics: dict[str, float] = {}
    for row, (name, m) in enumerate(models.items()):
        m.train(was_training[name])
        loss, top1, top5, count, top1_flip, top5_flip = totals[row].tolist()
        metrics.update({f"{name}/loss": loss / count, f"{name}/top1": top1 / count, f"{name}/top5": top5 / count})
        if flip:
            metrics.update({f"{name}/top1_flip": top1_flip / count, f"{name}/top5_flip": top5_flip / count})
    return metrics


def _batch_sums(model: torch.nn.Module, inputs: torch.Tensor, mirrored_inputs: Optional[torch.Tensor],
                labels: torch.Tensor, k: int, device: torch.device, autocast: Any) -> torch.Tensor:
    """One batch's (loss sum, top-1 hits, top-5 hits, count, flip top-1 hits, flip top-5 hits)."""
    with autocast() if autocast else torch.autocast(device.type, enabled=False):
        logits = model(inputs).float()
        mirrored = model(mirrored_inputs).float() if mirrored_inputs is not None else None
    hits = logits.topk(k, dim=1).indices.eq(labels[:, None])
    flip_hits = ((logits + mirrored).topk(k, dim=1).indices.eq(labels[:, None]) if mirrored is not None
                 else torch.zeros_like(hits))
    return torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                        hits[:, 0].sum().double(), hits.any(1).sum().double(),
                        torch.tensor(len(labels), dtype=torch.float64, device=device),
                        flip_hits[:, 0].sum().double(), flip_hits.any(1).sum().double()])


@dataclass(frozen=True)
class Evaluator:
    """`evaluate` as a run configures it: batches of `train.eval_batch_size`, the model's memory
    format, and flip TTA (`eval.flip_tta`)."""

    batch_size: int
    channels_last: bool = True
    flip: bool = False

    @classmethod
    def from_config(cls, cfg: Config) -> Evaluator:
        return cls(cfg.train.eval_batch_size, cfg.model.channels_last, cfg.eval.flip_tta)

    def score(self, model: torch.nn.Module, cache: ImageCache, device: torch.device, world_size: int = 1,
              rank: int = 0, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, autocast: Any = None,
              prefix: str = "val") -> dict[str, float]:
        return evaluate(model, cache, self.batch_size, device, world_size, rank, reduce, self.channels_last,
                        autocast, self.flip, prefix)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tinydist.runtime import cli

    return cli.run(lambda: _main(argv))


def _main(argv: Optional[Sequence[str]]) -> int:
    import argparse
    import os

    from tinydist.ckpt.checkpointer import CheckpointError
    from tinydist.config import load_config
    from tinydist.data.cache import load_split
    from tinydist.export.writer import load_model_weights
    from tinydist.model.build import build_model

    parser = argparse.ArgumentParser(
        prog="python -m tinydist.evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score a checkpoint or an exported model: top-1, top-5 and loss on a split.",
        usage="%(prog)s --checkpoint PATH [--split SPLIT] [--json] [--config FILE] [--section.key=VALUE ...]",
        epilog="Metrics are named after the split scored: val/top1 etc. for the run's data.val_split (as in\n"
               "training's metrics.jsonl), SPLIT/top1 etc. for any other (--split train: train/top1).\n"
               "Any other argument is a config override (--config FILE, --section.key=VALUE, --section.key VALUE)\n"
               "applied over the config saved with the checkpoint, e.g. --data.source=PATH.\n"
               "Every config key, with its type, default and meaning:\n"
               "    python -m tinydist.config --help")
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint folder (step-N) or an exported model folder")
    parser.add_argument("--split", default=None, help="split to score (default: data.val_split)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args, overrides = parser.parse_known_args(argv)
    local = os.path.expanduser(args.checkpoint)
    if "://" not in args.checkpoint and not os.path.isdir(local):
        what = "a file, not a folder" if os.path.exists(local) else "no such folder"
        raise CheckpointError(f"--checkpoint {args.checkpoint}: {what}; expected a checkpoint folder "
                              "({checkpoint.dir}/step-N) or an exported model folder ({train.output_dir}/model)")
    weights, saved_config = load_model_weights(local)
    cfg = load_config(overrides, base=saved_config)
    split = args.split or cfg.data.val_split
    # The run's validation split keeps training's names (metrics.jsonl, checkpoint.best_metric, the
    # model card), so the figures compare as they are; any other split is named, never passed off as val.
    prefix = "val" if split == cfg.data.val_split else split
    cache = load_split(cfg.data, split, cfg.data.max_val_samples, log=lambda m: print(m, file=sys.stderr))
    model = build_model(cfg.model, len(cache.classes))
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # load_state_dict's shape report: say what to change
        raise CheckpointError(f"{args.checkpoint} does not fit model.stem={cfg.model.stem} with {len(cache.classes)} "
                              f"classes: {str(e).splitlines()[-1].strip()}; expected the config the run was trained "
                              "with") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    metrics: dict[str, Any] = evaluate(model.to(device), cache, cfg.train.eval_batch_size, device,
                                       channels_last=cfg.model.channels_last, prefix=prefix)
    metrics.update(split=split, images=len(cache))
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{args.checkpoint}: {prefix} top-1 {metrics[f'{prefix}/top1']:.4f}  top-5 {metrics[f'{prefix}/top5']:.4f}  "
              f"loss {metrics[f'{prefix}/loss']:.4f}  ({len(cache)} images of split {split} of {cfg.data.source})")
    return 0

