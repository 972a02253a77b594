"""Matrix factorisation: item embeddings and biases."""
