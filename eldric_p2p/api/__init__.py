"""What clients talk to: the OpenAI-compatible gateway, the router across backends, metrics and the dashboard.

May import: `pipeline`, `net`, `engine`, `data`, the base. Nothing below imports from here.
"""
