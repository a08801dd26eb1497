"""Configuration files: Hadoop site files for the local cluster, and model/training YAML."""
