"""Score extrapolation: predict the scores of unscored samples from their scored neighbours."""
