"""t-SNE iterations against the map they give: the features stage's embedding maps, measured.

    python benchmarks/tsne.py                      # build/pipeline/mnist/features/mnist (pipeline.py's)
    python benchmarks/tsne.py --features DIR       # any features/<dataset> folder of a pipeline run

For every ``<arch>/seed-<seed>/embeddings.pt`` under ``--features`` (the penultimate-layer
embeddings of the test set that the features stage saves), the stage's own t-SNE
(:func:`mnistlab.stages.features.tsne_map`, its seeded subsample of
``features.tsne_max_points`` and its perplexity) is run for several ``max_iter`` values.
Per run: seconds, the final KL divergence, and two measures of the 2-D map itself:

- 10-NN accuracy: a 10-nearest-neighbour classifier on the map's coordinates (5-fold
  cross-validation, ``sklearn.model_selection``): how well the classes separate;
- trustworthiness (``sklearn.manifold.trustworthiness``, 10 neighbours): how well each
  point's map neighbours are its neighbours in the embedding.

Chooses params.yaml's ``features.tsne_max_iter``. Writes
``benchmarks/results/tsne-<device>.{json,md}`` (t-SNE runs on the CPU), with the CPU's flags.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from benchlib import cpu
from sklearn.manifold import trustworthiness
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from mnistlab.config import FeatureSettings, load_params, seed_of
from mnistlab.stages.features import tsne_map, tsne_subsample
from mnistlab.utils import torch_load, write_json

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = (1000, 750, 500, 350)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=Path, default=ROOT / "build" / "pipeline" / "mnist" / "features" / "mnist")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    params = load_params(args.params)
    settings, seed = FeatureSettings.from_params(params), seed_of(params)
    files = sorted(args.features.glob("*/seed-*/embeddings.pt"))
    if not files:
        raise SystemExit(f"error: no */seed-*/embeddings.pt under {args.features} (run the pipeline first)")
    rows = []
    for path in files:
        saved = torch_load(path)
        emb, labels = saved["embeddings"].numpy(), saved["labels"].numpy()
        idx = tsne_subsample(len(emb), settings.tsne_max_points, seed)
        x, y = emb[idx], labels[idx]
        for max_iter in ITERATIONS:
            t0 = time.perf_counter()
            xy, kl = tsne_map(x, seed, settings.tsne_perplexity, max_iter)
            seconds = time.perf_counter() - t0
            knn = cross_val_score(KNeighborsClassifier(10), xy, y, cv=5).mean()
            rows.append({"run": str(path.parent.relative_to(args.features)), "points": len(idx),
                         "dims": emb.shape[1], "max_iter": max_iter, "seconds": seconds, "kl": kl,
                         "knn10_accuracy": float(knn),
                         "trustworthiness": float(trustworthiness(x, xy, n_neighbors=10))})
            print(rows[-1], flush=True)

    model_name, simd = cpu()
    result = {"device": "cpu", "device_name": model_name, "cpu_flags": " ".join(simd),
              "threads": torch.get_num_threads(), "features": str(args.features),
              "perplexity": settings.tsne_perplexity, "params_yaml_max_iter": settings.tsne_max_iter,
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "tsne-cpu"
    write_json(stem.with_suffix(".json"), result)
    lines = [f"The features stage's t-SNE (`features.tsne_map`: {rows[0]['points']:,} seeded points of "
             f"each embedding in `{args.features}`, perplexity {settings.tsne_perplexity:g}) by "
             f"`max_iter` (250 of them early exaggeration), on {model_name} "
             f"({result['cpu_flags']}; {result['threads']} threads). Bold: params.yaml's "
             f"`features.tsne_max_iter` ({settings.tsne_max_iter}).", "",
             "| run | max_iter | seconds | KL | 10-NN accuracy on the map | trustworthiness (10) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mark = "**" if r["max_iter"] == settings.tsne_max_iter else ""
        lines.append(f"| {r['run']} | {mark}{r['max_iter']}{mark} | {r['seconds']:.1f} | {r['kl']:.3f} | "
                     f"{r['knn10_accuracy']:.4f} | {r['trustworthiness']:.4f} |")
    lines += ["", "| max_iter | seconds, sum | 10-NN accuracy, mean | trustworthiness, mean |",
              "|---:|---:|---:|---:|"]
    for max_iter in ITERATIONS:
        sel = [r for r in rows if r["max_iter"] == max_iter]
        lines.append(f"| {max_iter} | {sum(r['seconds'] for r in sel):.1f} | "
                     f"{np.mean([r['knn10_accuracy'] for r in sel]):.4f} | "
                     f"{np.mean([r['trustworthiness'] for r in sel]):.4f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
