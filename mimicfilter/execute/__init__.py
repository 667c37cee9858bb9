"""Where work runs: this process's share (partition), local worker processes, Ray actors.

Generic: executors take work units and picklable worker factories and never import the pipeline.
"""
