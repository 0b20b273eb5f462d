"""Command-line tools (installed as the package `dalle_tools`; each module runs as `python tools/NAME.py`)."""
