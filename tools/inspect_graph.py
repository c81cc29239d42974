#!/usr/bin/env python
"""Same as ``python -m fxquant inspect``: compile FILE.py:FACTORY and print the report and graph.

    python tools/inspect_graph.py path/to/file.py:factory --spec int8wo
"""
import sys

from fxquant.cli import main

if __name__ == "__main__":
    sys.exit(main(["inspect", *sys.argv[1:]]))
