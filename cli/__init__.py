"""The mimicfilter command line (installed as ``mimicfilter_cli``): thin click commands over the library."""
