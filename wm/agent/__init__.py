"""The LightningModules and their update: the world model (the core plus a representation
objective), the actor-critic, and `Agent`, which trains both with one optimiser and acts. Imports
wm.model and wm.objectives only.

    from wm.agent import Agent
"""

from wm.agent.agent import ActState, Agent

__all__ = ["ActState", "Agent"]
