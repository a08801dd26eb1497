"""The per-rank reader: epoch plans (planner), what a rank holds of the index (rank_index), each worker's share
(work), the chunk fetcher (chunks), batch forming (batches) and ShardDataset / ShardLoader (shard_reader)."""
