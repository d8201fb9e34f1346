"""The language model: a keras-hub Gemma tapped at residual-stream layers, the extract stage that
stores those activations, the forward pass with an SAE spliced in, and steered generation."""
