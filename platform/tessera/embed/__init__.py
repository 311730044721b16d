"""The batch embedding job (Ray Data): items table in object storage -> per-modality embeddings."""
