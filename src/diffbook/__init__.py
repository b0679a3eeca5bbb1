"""diffbook: the helper package of *Diffusion Models, Executable* — one small module per job."""
__version__ = "0.1.0"
