"""Tools around the pipeline: the CI regression gate, the reproduction of the tutorials, checks.

The gate and the reproduction run the pipeline in copies of the working tree and
judge its results. No pipeline stage imports these modules (dvc.yaml lists none of
them), so editing them re-runs nothing.

- :mod:`mnistlab.ci.copies`: what both share: the copies of the tree, their
  params.yaml and running ``dvc repro`` in them side by side.
- :mod:`mnistlab.ci.gate`: ``make ci-gate`` / ``make baseline``.
- :mod:`mnistlab.ci.reproduce`: ``make reproduce``.
- :mod:`mnistlab.ci.deps`: dvc.yaml's code deps checked against the import graph.
"""
