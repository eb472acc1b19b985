"""robustkd: robust knowledge distillation from possibly backdoored teachers."""

__version__ = "0.1.0"
