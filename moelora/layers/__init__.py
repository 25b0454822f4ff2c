"""Building blocks shared by every model family: linear layers, norms, rotary, embeddings, MoE."""
