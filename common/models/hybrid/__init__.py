"""The hybrid: free item embeddings plus a MiniLM text tower (head, optionally LoRA)."""
