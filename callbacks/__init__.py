"""Lightning callbacks: environment interaction."""

from callbacks.env_loop import EnvLoop, EnvSpec

__all__ = ["EnvLoop", "EnvSpec"]
