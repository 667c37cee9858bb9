"""Near-duplicate search: clusters of embeddings, then the pairs above a cosine floor inside each cluster."""
