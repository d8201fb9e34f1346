"""Data: corpus readers, Beam tokenize, token shards, the activation stream, the activation store,
.npy activation files, and `batches()`, the one way every source reaches training."""
