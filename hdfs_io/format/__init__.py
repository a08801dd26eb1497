"""The dataset format: names, columns and versions (dataset_format), opening a packed dataset (dataset), and
Hadoop SequenceFiles (sequencefile). What pack writes and every reader reads."""
