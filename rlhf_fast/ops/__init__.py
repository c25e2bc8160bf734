"""Fused RLHF ops. See each function's docstring for shapes and formulas."""
