"""The scoring pipeline: read → decode → batch → score → write, for every mode (static, trajectory, embed)."""
