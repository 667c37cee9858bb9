"""The mimic score: losses, the JVP, models and mimic layers, the scorers, GradMimic."""
