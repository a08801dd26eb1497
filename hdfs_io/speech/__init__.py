"""Audio and features: decoding and resampling (audio), log-mel and spectrogram features (features), their
normalization statistics (feature_stats), and deterministic augmentation (augmentation)."""
