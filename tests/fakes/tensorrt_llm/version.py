"""TEST DOUBLE (see tensorrt_llm/__init__.py): the release it stands in for."""
__version__ = "1.2.1"
