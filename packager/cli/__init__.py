"""The ``edgedeploy`` command line: thin adapters over the Python API."""
