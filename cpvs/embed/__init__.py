"""Self-supervised embeddings of fields (DINO / WS-DINO) and their attention maps."""
