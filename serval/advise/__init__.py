"""The advisor: requirements and bench measurements -> a ranked, reasoned recommendation."""
