"""Data: raw videos to WebDataset shards (`prepare`), and shards to batches (`AVShardDataModule`).

Layout of the shards: docs/shards.md. Modules are imported where used (`avsync.data.prepare`,
`avsync.data.datamodule`, ...) so that importing this package stays cheap.
"""
