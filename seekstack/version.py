"""The installed distribution's version, as `seekstack --version` prints it (`seekstack.__version__`)."""

from importlib.metadata import version

__version__ = version("seekstack")
