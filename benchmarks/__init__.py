"""`python -m benchmarks` (`make bench`): the performance benchmarks, written to `BENCHMARKS.md` and
`benchmarks.json`.

One module per subject - `pretrain` (the ViT-B training step, its FLOPs, MFU, time breakdown and the
effect of each CPU optimization), `inference` (feature extraction), `retrieval`, `probe` (with and
without the feature cache) and `data` (`prepare` and the loader) - measured by `harness` (warm-up,
medians, interleaved comparisons, one process per benchmark) and written up by `report`. The list of
benchmarks, their full and `--quick` settings and the targets they are judged against: `suite`.
"""
