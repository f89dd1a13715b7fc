"""What a trained DenseNet learned to reuse (the paper's Figure 5), and its size and cost.

    python -m densenet_ray.analyze models:/densenet-digits@champion --out analysis/
    python -m densenet_ray.analyze ~/.densenet_ray/runs/cifar10-r1 --no-log

    from densenet_ray.analyze import feature_reuse
    blocks = feature_reuse(net)   # per dense block: (L+1) x (L+1) array, rows = source s, columns = target

Figure 5: for dense block b with L layers, target l in 1..L reads the concatenation of the block's
input (source s = 0: the previous transition's output, or the stem's) and of layers 1..l-1; its
first convolution (conv1: the 1x1 bottleneck in DenseNet-B, the 3x3 conv otherwise) has one slice
of input channels per source. The value at (s, l) is the mean absolute weight of that slice, its
L1 norm divided by the number of weights, so sources of k and of many channels compare. The last
column is the layer after the block: the transition's 1x1 conv, or for the last block the
classifier's Linear weights over the block's output channels. Each column is divided by its
maximum, as in the paper, so colours compare sources for one target. (s, l) with s >= l is empty.
BatchNorm's per-channel scale in front of each conv is not folded in, as in the paper.

Writes DIR/feature_reuse.png (the heat maps), feature_reuse.json (the numbers) and summary.json
(parameters, GMACs at the model's input size, depth, k, blocks), prints the summary, and logs the
three to the model's MLflow run under analysis/ (--no-log skips that).
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import torch

from densenet_ray import cli, trained
from densenet_ray.model import DenseNet, count_macs


def feature_reuse(net: DenseNet) -> list[np.ndarray]:
    """Per dense block, the (L+1, L+1) Figure 5 matrix: [s, l-1] for target layer l, [s, L] for the
    transition or classifier after the block; NaN where target l cannot read source s (s >= l)."""
    blocks = []
    modules = dict(net.features.named_children())
    for b, layers in enumerate(net.block_config, start=1):
        block = modules[f"denseblock{b}"]
        k = net.growth_rate
        first = block["denselayer1"].conv1.weight.shape[1]  # channels of the block's input
        after = modules[f"transition{b}"].conv.weight if f"transition{b}" in modules else net.classifier.weight
        targets = [block[f"denselayer{l}"].conv1.weight for l in range(1, layers + 1)] + [after]
        matrix = np.full((layers + 1, layers + 1), np.nan)
        for column, w in enumerate(targets):
            w = w.detach().abs().float()
            w = w.reshape(w.shape[0], w.shape[1], -1)  # Linear (out, in) and conv (out, in, kh, kw) alike
            sources = column + 1  # target l reads sources 0..l-1; the last one reads all L+1
            edges = [0] + [first + s * k for s in range(sources)]
            if w.shape[1] != edges[-1]:
                raise ValueError(f"dense block {b}, target {column + 1}: {w.shape[1]} input channels, expected "
                                 f"{edges[-1]} ({first} + {sources - 1} x k={k})")
            matrix[:sources, column] = [w[:, lo:hi].mean().item() for lo, hi in zip(edges, edges[1:])]
            matrix[:sources, column] /= matrix[:sources, column].max()
        blocks.append(matrix)
    return blocks


def plot(blocks: list[np.ndarray], title: str, path: str) -> None:
    """Figure 5: one heat map per dense block, target layer across, source layer down, on the paper's
    fixed 0..1 scale; the column after each block (transition, classifier) boxed."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display
    from matplotlib.patches import Rectangle

    fig = Figure(figsize=(4.2 * len(blocks) + 1, 4.6), layout="constrained")
    axes = fig.subplots(1, len(blocks), squeeze=False)[0]
    for b, (ax, m) in enumerate(zip(axes, blocks), start=1):
        n = m.shape[0]
        image = ax.imshow(np.ma.masked_invalid(m), cmap="jet", vmin=0, vmax=1, origin="upper",
                          extent=(0.5, n + 0.5, n - 0.5, -0.5))
        if n <= 13:  # small blocks (CIFAR's L=40 has 13 per block) get their numbers written in
            for (s, col), v in np.ndenumerate(m):
                if not np.isnan(v):
                    ax.text(col + 1, s, f"{v:.2f}", ha="center", va="center", fontsize=8 if n <= 8 else 5,
                            color="white" if v > 0.75 or v < 0.25 else "black")
        last = "Classification layer" if b == len(blocks) else f"Transition layer {b}"
        ax.add_patch(Rectangle((n - 0.5, -0.5), 1, n, fill=False, edgecolor="black", linewidth=2))
        ticks = _ticks(n)
        layers = [t + 1 for t in ticks if t + 1 < n - (len(ticks) < n)]  # no label crowding the T/C one
        ax.set_xticks(layers + [n], [str(t) for t in layers] + ["T" if b < len(blocks) else "C"])
        ax.set_yticks(ticks, [str(t) for t in ticks])
        ax.set(title=f"Dense block {b}", xlabel=f"Target layer (l); last column: {last}",
               ylabel="Source layer (s); 0: the block's input")
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="mean |weight|, / column max")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def _ticks(n: int) -> list[int]:
    step = max(1, math.ceil(n / 8))
    return list(range(0, n, step))


def summary(model: trained.Model) -> dict:
    net = model.net
    return {"model": model.name, "source": model.source, "arch": model.config.arch, "depth": net.depth,
            "growth_rate": net.growth_rate, "block_config": list(net.block_config), "bottleneck": net.bottleneck,
            "compression": net.compression, "classes": model.num_classes, "channels": model.channels,
            "input_size": model.image_size, "params": sum(p.numel() for p in net.parameters()),
            "gmacs": count_macs(net, model.image_size) / 1e9}


def analyze(model: trained.Model, out: str) -> tuple[dict[str, str], dict]:
    """Write the heat map, its numbers and the summary into `out`; returns ({what: path}, summary)."""
    os.makedirs(out, exist_ok=True)
    blocks = feature_reuse(model.net)
    paths = {k: os.path.join(out, f) for k, f in
             (("png", "feature_reuse.png"), ("json", "feature_reuse.json"), ("summary", "summary.json"))}
    facts = summary(model)
    plot(blocks, f"{model.name}: {facts['arch']}, depth {facts['depth']}, k={facts['growth_rate']}  -  "
                 "average absolute filter weights (Figure 5)", paths["png"])
    with open(paths["json"], "w") as f:
        f.write(_matrices_json(blocks))
    with open(paths["summary"], "w") as f:
        json.dump(facts, f, indent=2)
    return paths, facts


def _matrices_json(blocks: list[np.ndarray]) -> str:
    """{"rows", "columns", "blocks": [matrix, ...]} with one matrix row per line, null where empty."""
    def row(values):
        return json.dumps([None if np.isnan(v) else round(float(v), 6) for v in values])

    matrices = ",\n".join("  [\n" + ",\n".join("   " + row(r) for r in m) + "\n  ]" for m in blocks)
    return ('{\n "rows": "source s, 0 = the block\'s input",\n "columns": "target layer 1..L, then the transition '
            '(classifier after the last block)",\n "blocks": [\n' + matrices + "\n ]\n}\n")


def main(argv: list[str] | None = None) -> int:
    p = cli.model_parser("analyze", __doc__, logs=True)
    p.add_argument("--out", default="analysis", metavar="DIR", help="folder for the PNG and JSON files")
    p.add_argument("--no-log", action="store_true", help="write files only; log nothing to MLflow")
    args = p.parse_args(argv)
    try:
        model = trained.load(args.model, tracking_uri=args.mlflow_tracking_uri, trust_pickle=args.trust_pickle)
        with torch.no_grad():
            paths, facts = analyze(model, args.out)
        print(f"[densenet_ray] {model.name}: {facts['arch']}, depth {facts['depth']}, k={facts['growth_rate']}, "
              f"blocks {facts['block_config']}, {facts['params']:,} parameters, {facts['gmacs']:.4f} GMACs at "
              f"{facts['input_size']}x{facts['input_size']}")
        print(f"[densenet_ray] Figure 5 heat map: {paths['png']}")
        if not args.no_log:
            run_id = trained.record(model, artifacts=list(paths.values()), artifact_dir="analysis")
            print(f"[densenet_ray] logged to MLflow run {run_id} under analysis/")
    except cli.ERRORS as err:
        return cli.error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
