"""One module per CLI command; see :mod:`mpidl.__main__`."""
