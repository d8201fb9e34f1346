"""The language model: a keras-hub Gemma tapped at residual-stream layers, run block by block with
an SAE spliced in, and generation with a steering vector."""
