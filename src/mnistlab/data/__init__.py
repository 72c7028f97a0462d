"""Datasets: fetch, verify, parse and split the MNIST family into one raw format.

Every dataset ends up the same way on disk, so later stages never care where
it came from:

    data/raw/<name>/          the four IDX files under the official MNIST names,
                              uncompressed (``t10k-*`` may be absent: then the
                              split stage carves a test set out of train), the
                              ``.gz`` files as downloaded from a URL (kept so a
                              rerun can verify them without the network), and
                              manifest.json (where each file came from, its MD5).
                              With ``take`` in the source, the IDX files hold only
                              the first N train / M test samples, cut after the
                              full files were verified; the kept ``.gz`` files and
                              the manifest's digests stay those of the full files
    data/split/<name>/        train.pt, val.pt, test.pt  ({images: uint8 [N,28,28],
                              labels: int64 [N]}, loadable with weights_only=True)
                              and summary.json (their format and loaders:
                              :mod:`mnistlab.artifacts`)

Download, MD5 checks and IDX parsing are torchvision's (``download_url``,
``check_integrity``, ``read_image_file``/``read_label_file``); what we add is
what they lack for a pipeline: a timeout, retries with backoff, falling back
across mirrors, detecting a download cut short (Python's HTTP client does not),
an all-or-nothing output directory, and one-line errors that name the file.

One job per module; import a name from the module that owns it (this package
re-exports nothing, so importing it loads neither torchvision nor torch):

    sources     Source, resolve_source: ``sources.<name>`` in params.yaml, and the
                official constants (TORCHVISION, OFFICIAL_CONTENT_MD5, DIGESTS, ...)
    download    fetch: mirrors, retries, digests, manifest.json, ``take``, the
                all-or-nothing raw folder (settings: config.DownloadSettings)
    idx         the raw format: FILES/IMAGES/LABELS, read_pair, validate_raw, write_idx
    digits      the embedded sklearn digits: digits_as_mnist, write_digits
    split       split: raw IDX files → train/val/test (written by artifacts.save_split)
"""
