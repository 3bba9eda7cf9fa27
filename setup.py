"""Which packages the wheel carries; the rest of the metadata is in pyproject.toml.

The device profiles stay at the repository root (``device-profiles/``, data that users read and
edit); the wheel carries them as the package data ``edge_agent/device_profiles/``, where
``edge_agent.profiles`` finds them when no checkout is around. The device's systemd unit
(``edge_agent/systemd/``) travels as package data too, and so do the controller's console (its page
template, script and stylesheet, read at run time) and systemd unit.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["packager*", "edge_agent*"]), "edge_agent.device_profiles"],
    package_dir={"edge_agent.device_profiles": "device-profiles"},
    package_data={"edge_agent.device_profiles": ["*.yaml", "*.json"], "edge_agent.systemd": ["*.service"],
                  "packager.control.console": ["*.html", "*.js", "*.css"], "packager.control.systemd": ["*.service"]},
)
