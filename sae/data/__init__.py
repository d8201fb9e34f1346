"""Data: corpus readers, the tokenize stage (Beam), token shards, the activation stream, the
activation store, .npy activation files, and `batches()` that every training source goes through."""
