"""Training MoE language models on real text.

- ``config``: ``TrainConfig`` and ``RunConfig`` (a run's ``config.json``), ``--set`` parsing;
- ``data``: the corpus (default: this Python's standard library), train/val split, batches;
- ``tokenizer``: byte-level BPE or raw bytes, and the on-disk cache of tokenizers and tokens;
- ``loop``: ``train()`` (a run directory in, a trained model out), ``evaluate``, ``load_run``;
- ``checkpoint``: atomic, checksummed checkpoints; ``metrics``: ``metrics.jsonl``;
- ``plots`` and ``progress``: PNGs and the rich progress bar;
- ``ablation`` and ``compare``: expert ablation and the registry of comparative studies.
"""
