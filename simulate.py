#!/usr/bin/env python
"""The main job: a federated simulation of the whole federation on this machine (Flower's
simulation engine, Ray). ``python simulate.py --help`` lists the options; the code is
:mod:`server.simulation`."""

import sys

from server.simulation import main

if __name__ == "__main__":
    sys.exit(main())
