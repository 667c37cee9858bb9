"""Reading samples: discover shard specs, stream tar shards, decode samples into model inputs."""
