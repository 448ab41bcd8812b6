"""Test shim: the module file needs ctk importable; no widget is built in tests."""
